"""An example structure living in its own folder: ``isotropic``, F and EF as multiples of I.

``F_S = (tr F / D) I`` and ``EF_S = (tr EF / D) I`` per layer: the crudest scalar
preconditioner (what a learning rate alone assumes). Every statistic follows from the two
traces, the mean gradient and ``D``, so the structure needs only the diagonals. It is
registered from the tests with :func:`fisher_monitor.structures.register` — one line, no
other module touched — to show that a new structure is one folder plus one registry line.
"""

from __future__ import annotations

import math

import torch

from fisher_monitor.factors import CURVATURE_BYTES, LayerShape, PassSize
from fisher_monitor.metrics import DampedStatistics, LayerStatistics
from fisher_monitor.structures.base import LayerInput, LayerResult, Structure


class Isotropic(Structure):
    """``F_S = f I``, ``EF_S = e I`` with ``f = tr F / D``, ``e = tr EF / D``."""

    name = "isotropic"

    @property
    def needs_factors(self) -> bool:  # noqa: D102 - the diagonals suffice
        return False

    def layer(self, layer: LayerInput, directions: bool = False) -> LayerResult:  # noqa: D102
        d = layer.info.dimension
        f = layer.fisher_diag.sum() / d
        e = layer.empirical_diag.sum() / d
        g = layer.gradient.to(torch.float64)
        grad_sq = g.square().sum()
        damped = []
        for damping in layer.dampings:
            a, b = f + damping, e + damping
            damped.append(
                DampedStatistics(
                    damping_mass=torch.as_tensor(damping * d, dtype=torch.float64),
                    kl=0.5 * d * (b / a - 1.0 - torch.log(b / a)),
                    grad_sq=grad_sq,
                    nat_sq=grad_sq / a**2,
                    ef_sq=grad_sq / b**2,
                    nat_ef=grad_sq / (a * b),
                    nat_projection=grad_sq / a,
                    ef_projection=grad_sq / b,
                    ef_projection_per_sample=d * e / b,
                )
            )
        statistics = LayerStatistics(
            dimension=d,
            trace_f=f * d,
            trace_ef=e * d,
            frob_f_sq=f**2 * d,
            frob_ef_sq=e**2 * d,
            inner=f * e * d,
            frob_diff_sq=(e - f) ** 2 * d,
            damped=damped,
        )
        found = None
        if directions:
            found = [(g / (f + damping), g / (e + damping)) for damping in layer.dampings]
        return LayerResult(statistics, found)

    def flops(self, shape: LayerShape, size: PassSize) -> float:  # noqa: D102
        return 4.0 * shape.dimension * (1 + size.dampings)

    def peak_bytes(self, shape: LayerShape, size: PassSize) -> int:  # noqa: D102
        return CURVATURE_BYTES * max(1, math.ceil(math.log2(shape.dimension + 1)))
