"""``block`` under a sketch: the Fisher-inverse metrics from exact-Fisher solves.

The sketched replicates (:mod:`~.sketched`) have every statistic except those that need
``(F_b + λI)⁻¹`` of the exact Fisher: ``kl``, ``direction_cosine``, ``nat_grad_cosine`` and
``nat_projection``. When the measurement runs exact-Fisher solves
(:mod:`fisher_monitor.structures.fisher_solves`), a layer's result is deferred: during the
pass it keeps the per-sample gradients (the right-hand sides), and after the pass the
engine's conjugate-gradient and Lanczos solves fill in, for every replicate and damping
``λ`` (with ``A = F_b + λI``, ``B = EF_b + λI``):

    nat_sq = ‖A⁻¹g‖²,   nat_projection = gᵀA⁻¹g,   nat_ef = ⟨A⁻¹g, B⁻¹g⟩
    kl = ½[tr(EF_b A⁻¹) + log det(I + F_b/λ) − tr(F_b A⁻¹) − log det(I + EF_b/λ)]

``B⁻¹g = U(λI + K_U)⁻¹a`` and ``log det(I + EF_b/λ)`` are the exact EF side; ``A⁻¹g`` is
deterministic up to the solver's tolerance; the trace terms of the KL are stochastic
Lanczos quadratures and carry the probes' variance. Under relative damping each replicate
has its own ``λ``, so the jackknife also covers the damping's noise in these metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from fisher_monitor.estimators import Replicates
from fisher_monitor.factors import LayerFactors, MaterializedFactors
from fisher_monitor.metrics import DampedStatistics
from fisher_monitor.structures.base import Directions, LayerInput
from fisher_monitor.structures.block.sketched import FISHER_INVERSE_METRICS
from fisher_monitor.structures.empirical import EmpiricalSolve, empirical_solves
from fisher_monitor.structures.fisher_solves import (
    DeferredResult,
    LayerSolutions,
    ShiftSolution,
    SolvedResult,
    SolveRequest,
)

#: The metrics that need ``A⁻¹g`` (the others need only the traces).
DIRECTION_METRICS: frozenset[str] = frozenset(
    {"direction_cosine", "nat_grad_cosine", "nat_projection"}
)


def per_sample_gradients(factors: LayerFactors, like: Tensor) -> Tensor:
    """The per-sample gradients ``g_n`` as rows, ``(N, D)``, float64.

    Args:
        factors: The layer's factors (``U`` exact under a sketch).
        like: A tensor on the device the rows should be on (the mean gradient).
    """
    if isinstance(factors, MaterializedFactors):
        return factors.per_sample.to(device=like.device, dtype=torch.float64)
    n = factors.num_samples
    weights = torch.eye(n, dtype=torch.float64, device=like.device) * n**0.5
    return torch.stack([factors.u_combination(row).to(torch.float64) for row in weights])


def deferred_block(
    layer: LayerInput,
    factors: LayerFactors,
    replicates: Replicates,
    per_replicate: list[list[float]],
    directions: bool,
) -> DeferredResult:
    """A sketched layer's result that exact-Fisher solves will finish (module docstring).

    Args:
        layer: The layer (its EF Gram ``K_U`` is cached on it).
        factors: Its factors from the sketched pass.
        replicates: The sketched replicate statistics.
        per_replicate: The dampings of every replicate (full first).
        directions: Whether ``(A⁻¹g, B⁻¹g)`` should be returned too.
    """
    per_sample = per_sample_gradients(factors, layer.gradient)
    shifts = sorted({float(d) for row in per_replicate for d in row})
    request = SolveRequest(layer.info, layer.gradient.to(torch.float64), per_sample, shifts)
    gram_u = layer.gram_u()

    def finish(solutions: LayerSolutions) -> SolvedResult:
        flat = [d for row in per_replicate for d in row]
        solves = empirical_solves(gram_u, flat, dimension=factors.dimension)
        return _finished(replicates, per_replicate, request, solves, solutions, directions)

    return DeferredResult(
        replicates.full, None, replicates=replicates, request=request, finish=finish
    )


def _finished(
    replicates: Replicates,
    per_replicate: list[list[float]],
    request: SolveRequest,
    solves: Sequence[EmpiricalSolve],
    solutions: LayerSolutions,
    directions: bool,
) -> SolvedResult:
    """Fill the Fisher-inverse statistics of every replicate in (module docstring)."""
    rows = request.per_sample
    scale = rows.shape[0] ** -0.5
    stream = iter(solves)  # one per (replicate, damping), in order
    finished, variances, found = [], [], []
    for index, (statistics, dampings) in enumerate(
        zip([replicates.full, *replicates.leave_one_out], per_replicate, strict=True)
    ):
        damped = []
        for stats, damping in zip(statistics.damped, dampings, strict=True):
            empirical = next(stream)
            solution = solutions.at(damping)
            ef_direction = (empirical.coefficients.to(rows.dtype) @ rows) * scale
            updated, variance = _damped(stats, solution, ef_direction, empirical, solutions)
            damped.append(updated)
            if index == 0:
                variances.append(variance)
                found.append((solution.direction, ef_direction))
        finished.append(dataclasses.replace(statistics, damped=damped))
    unavailable = set(FISHER_INVERSE_METRICS)
    if solutions.directions_converged:
        unavailable -= DIRECTION_METRICS
    if solutions.traces_converged:
        unavailable.discard("kl")
    full = finished[0]
    result = Replicates(full, finished[1:], replicates.unavailable & frozenset(unavailable))
    kept: Directions | None = None
    if directions and solutions.directions_converged:
        kept = [(x, y) for x, y in found if x is not None]
    return SolvedResult(full, kept, replicates=result, kl_variance=variances, solutions=solutions)


def _damped(
    stats: DampedStatistics,
    solution: ShiftSolution,
    ef_direction: Tensor,
    empirical: EmpiricalSolve,
    solutions: LayerSolutions,
) -> tuple[DampedStatistics, Tensor | None]:
    """One replicate's damped statistics with the solved quantities filled in."""
    updates: dict[str, Tensor] = {}
    if solutions.directions_converged and solution.direction is not None:
        x = solution.direction
        updates.update(
            nat_sq=x @ x,
            nat_ef=x @ ef_direction.to(x.dtype),
            nat_projection=solution.projection,
        )
    variance = None
    kl = solution.kl(empirical.logdet_ratio) if solutions.traces_converged else None
    if kl is not None:
        updates["kl"], variance = kl
    return dataclasses.replace(stats, **updates), variance


__all__ = [
    "DIRECTION_METRICS",
    "deferred_block",
    "per_sample_gradients",
]
