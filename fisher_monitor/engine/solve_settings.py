"""How the exact-Fisher solves run, and their cost: planned, timed before they run, watched.

The solves (:mod:`~fisher_monitor.engine.exact_solves`) run as :class:`SolveSettings` say
and may cost :attr:`SolveSettings.budget_steps` training steps (``solve_budget``). The cost
model plans them per layer (:func:`planned_solves`); before they run, :class:`SolveMeter`
times one batch of products per layer against that plan; while they run, it stops them
once the budget is spent. See ``docs/theory.md#matrix-free``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fisher_monitor.engine.fisher_operator import LANE_BYTES
from fisher_monitor.engine.profile import NetworkProfile
from fisher_monitor.factors import LayerShape

if TYPE_CHECKING:
    from fisher_monitor.engine.fisher_operator import NetworkFunction
    from fisher_monitor.structures.fisher_solves import SolveRequest

#: Planning figures of the cost model: products per right-hand side of a solve to the
#: settings' ``tolerance`` and of a trace probe (measured: 100–500 and 100–300 on MLP and
#: transformer layers at relative damping 1e-3; the notes give the actual count).
PLANNED_SOLVE_ITERATIONS = 300
PLANNED_TRACE_ITERATIONS = 200


@dataclass(frozen=True)
class SolveSettings:
    """How the exact-Fisher solves run.

    Attributes:
        tolerance: Relative residual ``‖g − Ax‖/‖g‖`` of ``A⁻¹g``.
        trace_tolerance: Relative error bound of each quadrature of the KL's trace terms
            (``g_nᵀA⁻¹g_n``, and ``zᵀF A⁻¹z`` of each probe; far below the probes' own
            noise).
        max_iterations: Products per right-hand side at most; a layer that needs more
            leaves its metrics out.
        probes: Rademacher probes per layer for the trace terms of the KL.
        exact_samples: Up to this many samples, ``tr(EF A⁻¹)`` is solved per sample
            (exact); above, it is estimated with ``probes`` combinations of samples.
        budget_steps: The solves run when the cost model expects at most this many
            training steps of work for them, or at most ``floor_flops`` operations (a small
            network's training step is too small a unit); otherwise the metrics are left out,
            with a note.
        floor_flops: See ``budget_steps``.
        lane_bytes: Bytes one batched product may use for its vectors.
        dense_limit: Layers with at most this many parameters form ``F_b`` from ``D_b``
            products and are solved exactly (fewer products than the Krylov solves).
        dense_fallback: Layers with at most this many parameters whose conjugate gradients
            do not converge are solved densely instead (an embedding at initialisation).
        exact_head: Solve a softmax head (the network's last ``Linear`` layer, read by a
            cross-entropy) exactly by its block structure
            (:mod:`~fisher_monitor.engine.softmax_head`) instead of by products.
    """

    tolerance: float = 1e-6
    trace_tolerance: float = 1e-4
    max_iterations: int = 1000
    probes: int = 8
    exact_samples: int = 16
    budget_steps: float = 40_000.0
    floor_flops: float = 1e11
    lane_bytes: int = LANE_BYTES
    dense_limit: int = 4096
    dense_fallback: int = 8192
    exact_head: bool = True

    def right_hand_sides(self, samples: int) -> tuple[int, int]:
        """``(1, quadratures)``: the right-hand side ``g`` and the trace terms' ones."""
        sample_sides = samples if samples <= self.exact_samples else self.probes
        return 1, sample_sides + self.probes


#: The default settings.
DEFAULT_SOLVES = SolveSettings()


@dataclass(frozen=True)
class PlannedLayer:
    """The cost model's planning figures for one layer's solves.

    Attributes:
        products: Fisher-vector products (``D_b`` for a small layer).
        flops: Work of the layer's solves, in the cost model's units.
    """

    products: float
    flops: float


def planned_solves(
    profile: NetworkProfile, samples: int, shifts: int, settings: SolveSettings
) -> dict[str, PlannedLayer]:
    """Planned work of the solves, per layer (module docstring; planning figures).

    Per layer ``b`` and product: a forward-mode and a reverse-mode pass through the layers
    from ``b`` on (about ``3 N`` times their forward work), the primal forward once per
    batched call, and the Krylov vector updates (``D_b`` per shift and right-hand side); a
    layer within the settings' ``dense_limit`` takes ``D_b`` products and an
    eigendecomposition instead. Below a wide last layer (a classifier's head, a language
    model's unembedding) the products stop at its input, where the loss-Hessian folded
    through it weighs ``I × I`` per position
    (:mod:`~fisher_monitor.engine.folded_head`): its forward work is replaced by that.
    """
    solved, probed = settings.right_hand_sides(samples)
    planned = solved * PLANNED_SOLVE_ITERATIONS + probed * PLANNED_TRACE_ITERATIONS
    head = _wide_head(profile)
    saved = 0.0  # per batched forward, below the head
    if head is not None:
        folded = head.positions * float(head.inputs) ** 2
        saved = samples * max(head.forward_flops - folded, 0.0)
    above = samples * profile.forward_flops
    layers = {}
    for shape in profile.layers:  # in the prepared network's order (≈ execution order)
        d = float(shape.dimension)
        below = saved if shape is not head else 0.0
        forward = samples * profile.forward_flops - below  # the primal, once per call
        if shape.dimension <= settings.dense_limit:  # D products, one eigendecomposition
            flops = d * 3.0 * (above - below) + forward + 10.0 * d**3
            layers[shape.name] = PlannedLayer(d, flops)
        else:
            per_product = 3.0 * (above - below) + 10.0 * d * shifts
            flops = planned * per_product + PLANNED_SOLVE_ITERATIONS * forward
            layers[shape.name] = PlannedLayer(float(planned), flops)
        above -= samples * shape.forward_flops
    return layers


def _wide_head(profile: NetworkProfile) -> LayerShape | None:
    """The network's last layer if it is a matrix layer with more outputs than inputs."""
    if not profile.layers:
        return None
    last = profile.layers[-1]
    wide = last.form in ("outer", "shared") and last.outputs > last.inputs
    return last if wide else None


class OverBudget(Exception):
    """The solves ran past their budget (:class:`SolveMeter`)."""


class SolveMeter:
    """The solves' seconds against their budget, projected before they run and then watched.

    The cost model's product counts and costs (:func:`planned_solves`) can be far off for a
    given network (float64 convolutions on a CPU, transposed convolutions under ``vmap``, a
    tied embedding's products through the whole output), so before solving,
    :meth:`projected_seconds` times one batched product per layer and multiplies by the
    layer's planned products. While the solves run, :meth:`check` stops them once they have
    taken the whole budget (more iterations than planned).

    Args:
        budget_seconds: Seconds the solves may take.
        clock: Seconds (monotonic).
    """

    def __init__(self, budget_seconds: float, clock: Callable[[], float] = time.perf_counter):
        self.budget_seconds = budget_seconds
        self.clock = clock
        self.started = clock()

    @staticmethod
    def projected_seconds(
        function: NetworkFunction,
        requests: Mapping[str, SolveRequest],
        planned: Mapping[str, PlannedLayer],
        settings: SolveSettings,
        budget_seconds: float = math.inf,
    ) -> float:
        """Seconds the solves of ``requests`` would take, at the pace of a timed product.

        Per layer: one warm-up product, then one batch of as many products as the layer's
        right-hand sides, timed; times the layer's planned products. Stops once the sum
        exceeds ``budget_seconds`` (the layers not timed then count nothing).
        """
        total = 0.0
        generator = torch.Generator().manual_seed(0)
        for name, request in requests.items():
            layer = planned.get(name)
            if layer is None:
                continue
            dimension = request.gradient.numel()
            lanes = min(sum(settings.right_hand_sides(request.per_sample.shape[0])), dimension)
            operator = function.operator(request.info.parameter_names, settings.lane_bytes)
            options = {"dtype": torch.float64, "generator": generator}
            operator(torch.randn(1, dimension, **options).to(function.device))
            vectors = torch.randn(lanes, dimension, **options).to(function.device)
            started = time.perf_counter()
            operator(vectors)
            function.synchronize()
            total += layer.products * (time.perf_counter() - started) / lanes
            if total > budget_seconds:
                break
        return total

    def check(self) -> None:
        """Raise :class:`OverBudget` once the budget is spent (after each batched product)."""
        if self.clock() - self.started > self.budget_seconds:
            raise OverBudget


__all__ = [
    "DEFAULT_SOLVES",
    "PLANNED_SOLVE_ITERATIONS",
    "PLANNED_TRACE_ITERATIONS",
    "OverBudget",
    "PlannedLayer",
    "SolveMeter",
    "SolveSettings",
    "planned_solves",
]
