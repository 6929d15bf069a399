"""``kron``: a Kronecker-factored Fisher per layer against the exact EF block.

``F_S = G ⊗ A`` (KFC for layers with weight sharing, see
:class:`~fisher_monitor.curvature.factors.WeightSharingFactors`), compared with the exact
``EF_b``; layers without Kronecker factors (e.g. BatchNorm, layers measured with
``torch.func``) are skipped with a note. The relative damping ``λ_b`` is the one of the
exact block (from ``tr F_b``), as for the other structures.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fisher_monitor.curvature.factors import KroneckerFactors
from fisher_monitor.metrics import kronecker_statistics
from fisher_monitor.metrics.kronecker import OuterSamples
from fisher_monitor.structures.base import (
    Directions,
    LayerInput,
    LayerResult,
    Structure,
    StructureUnavailable,
)


class Kronecker(Structure):
    """Kronecker-factored Fisher ``G ⊗ A`` against the exact empirical Fisher block."""

    name = "kron"

    def layer(self, layer: LayerInput, directions: bool = False) -> LayerResult:  # noqa: D102
        factors = layer.require_factors()
        kron = factors.kronecker()
        if kron is None:
            raise StructureUnavailable(f"no Kronecker factorisation for a {layer.info.module_type}")
        statistics = kronecker_statistics(
            kron.input_factor,
            kron.output_factor,
            kron.samples,
            layer.gram_u(),
            layer.dampings,
            input_root=kron.input_root,
            output_root=kron.output_root,
            empirical=layer.empirical_solves(),
        )
        found = _directions(layer, kron) if directions else None
        return LayerResult(statistics, found)


def _mean_sample(samples: Tensor | OuterSamples) -> Tensor:
    if isinstance(samples, OuterSamples):
        return samples.output_grads.T @ samples.inputs / samples.inputs.shape[0]
    return samples.mean(dim=0)


def _directions(layer: LayerInput, kron: KroneckerFactors) -> Directions:
    """``((G ⊗ A + λI)⁻¹g, B⁻¹g)`` per damping, from full eigendecompositions of G and A."""
    factors = layer.require_factors()
    gamma, q_g = torch.linalg.eigh(0.5 * (kron.output_factor + kron.output_factor.T))
    alpha, q_a = torch.linalg.eigh(0.5 * (kron.input_factor + kron.input_factor.T))
    spectrum = gamma.clamp_min(0).unsqueeze(1) * alpha.clamp_min(0).unsqueeze(0)
    rotated = q_g.T @ _mean_sample(kron.samples) @ q_a
    found = []
    for damping, solve in zip(layer.dampings, layer.empirical_solves(), strict=True):
        natural = kron.order(q_g @ (rotated / (spectrum + damping)) @ q_a.T)
        found.append((natural, factors.u_combination(solve.coefficients)))
    return found
