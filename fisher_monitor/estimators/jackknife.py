"""Replicate groups and the jackknife: every estimated metric with its standard error.

An estimator draws its random columns in ``G`` independent *replicate groups*; each group
alone gives an unbiased estimate ``F̂_g`` of the Fisher, and the measurement uses their mean
``F̂ = (1/G) Σ_g F̂_g``. A metric ``θ = φ(F)`` (a ratio, a cosine, a KL divergence …) is
then evaluated on the full estimate, ``θ̂ = φ(F̂)``, and on the ``G`` leave-one-group-out
estimates ``θ_(i) = φ(F̂_(i))`` with ``F̂_(i) = (1/(G − 1)) Σ_{g ≠ i} F̂_g``. The
delete-one-group jackknife (Quenouille, Tukey; Efron & Stein, 1981) gives

    θ̄ = (1/G) Σ_i θ_(i)
    θ_J = G θ̂ − (G − 1) θ̄                           (bias-corrected estimate)
    v_J = ((G − 1)/G) Σ_i (θ_(i) − θ̄)²              (variance)

``θ_J`` removes the ``O(1/G)`` term of the bias of a smooth ``φ``; for a statistic that is
quadratic in ``F̂`` (``‖F̂‖²_F``) it is exactly the unbiased U-statistic over pairs of
distinct groups. The reported standard error is

    SE = √(v_J + (θ_J − θ̂)²)

the jackknife standard deviation with the size of the bias correction added in
quadrature: a metric whose correction is large against its noise (a strongly nonlinear
metric of a noisy estimate) is not presented as precise. The estimate is ``θ_J`` put back
into the metric's range (cosines in ``[−1, 1]``, non-negative quantities at ``≥ 0``).

Statistics are additive over layers, so the whole network's replicate ``i`` is the sum of
the layers' replicates ``i`` (the groups are the same random draws in every layer), and
``all`` gets its jackknife the same way. A layer measured exactly contributes the same
statistics to every replicate. See ``docs/theory.md#standard-errors``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from fisher_monitor import keys
from fisher_monitor.metrics import LayerStatistics, finalize


@dataclass
class Replicates:
    """A layer's statistics for the full estimate and each leave-one-group-out estimate.

    Attributes:
        full: Statistics of ``F̂`` (all groups).
        leave_one_out: Statistics of ``F̂_(i)``, one per group.
        unavailable: Metric names (without damping suffix) this estimator cannot give for
            the layer, e.g. those that need ``(F + λI)⁻¹`` of the exact Fisher.
    """

    full: LayerStatistics
    leave_one_out: list[LayerStatistics]
    unavailable: frozenset[str] = field(default_factory=frozenset)

    @property
    def groups(self) -> int:
        """``G``, the number of replicate groups."""
        return len(self.leave_one_out)

    @classmethod
    def fixed(cls, statistics: LayerStatistics, groups: int) -> Replicates:
        """Statistics known exactly: the same in every replicate."""
        return cls(statistics, [statistics] * groups)

    def __add__(self, other: Replicates) -> Replicates:
        if self.groups != other.groups:
            raise ValueError(f"Cannot add replicates of {self.groups} and {other.groups} groups.")
        return Replicates(
            self.full + other.full,
            [a + b for a, b in zip(self.leave_one_out, other.leave_one_out, strict=True)],
            self.unavailable | other.unavailable,
        )


def sum_replicates(replicates: Sequence[Replicates]) -> Replicates:
    """Add the replicates of several layers (the block-diagonal whole).

    Raises:
        ValueError: If ``replicates`` is empty.
    """
    if not replicates:
        raise ValueError("Cannot sum an empty list of replicates.")
    total = replicates[0]
    for item in replicates[1:]:
        total = total + item
    return total


@dataclass(frozen=True)
class Estimate:
    """A jackknifed metric.

    Attributes:
        value: The bias-corrected estimate ``θ_J``, within the metric's range.
        stderr: ``√(v_J + (θ_J − θ̂)²)``, or ``None`` when every replicate agrees exactly
            (the metric does not depend on the random columns, e.g. ``dimension``).
        plug_in: ``θ̂``, the metric of the full estimate.
    """

    value: float
    stderr: float | None
    plug_in: float


def jackknife(full: float, leave_one_out: Sequence[float]) -> Estimate:
    """Delete-one-group jackknife of one metric (see the module docstring).

    Args:
        full: ``θ̂``.
        leave_one_out: ``θ_(i)`` for each of the ``G ≥ 2`` groups.

    Returns:
        The estimate (range clamping is left to :func:`estimated_metrics`).
    """
    count = len(leave_one_out)
    if count < 2:
        raise ValueError(f"The jackknife needs at least 2 groups, got {count}.")
    values = [full, *leave_one_out]
    if not all(math.isfinite(v) for v in values):
        return Estimate(float("nan"), float("nan"), full)
    if all(v == full for v in leave_one_out):
        return Estimate(full, None, full)
    mean = sum(leave_one_out) / count
    corrected = count * full - (count - 1) * mean
    variance = (count - 1) / count * sum((v - mean) ** 2 for v in leave_one_out)
    return Estimate(corrected, math.sqrt(variance + (corrected - full) ** 2), full)


def _clamp(metric: str, value: float) -> float:
    if not math.isfinite(value):
        return value
    if metric in keys.COSINE_METRICS:
        low = 0.0 if metric == "matrix_cosine" else -1.0
        return min(1.0, max(low, value))
    return max(0.0, value)


def estimated_metrics(
    replicates: Replicates, dampings: Sequence[float], where: str = ""
) -> dict[str, Estimate]:
    """The metrics of a layer (or a sum of layers) with their jackknife standard errors.

    Every replicate is finalised like an exact measurement
    (:func:`~fisher_monitor.metrics.finalize`, range checks included); each metric is then
    jackknifed across the replicates.

    Args:
        replicates: The replicate statistics.
        dampings: The damping values (same order as the damped statistics).
        where: What the statistics describe, for error messages.

    Returns:
        Metric name (with ``@λ`` suffix where needed) to its estimate; metrics in
        ``replicates.unavailable`` are left out.
    """
    full = finalize(replicates.full, dampings, where=where)
    others = [finalize(s, dampings, where=where) for s in replicates.leave_one_out]
    out: dict[str, Estimate] = {}
    for metric, value in full.items():
        name = metric.partition("@")[0]
        if name in replicates.unavailable:
            continue
        estimate = jackknife(value, [o[metric] for o in others])
        out[metric] = Estimate(_clamp(name, estimate.value), estimate.stderr, estimate.plug_in)
    return out


def add_estimated_metrics(
    scalars: dict[str, float],
    structure: str,
    layer: str,
    replicates: Replicates,
    dampings: Sequence[float],
) -> None:
    """Write a layer's estimated metrics and their ``_se`` keys into ``scalars``."""
    estimates = estimated_metrics(replicates, dampings, where=f"{structure}/{layer}")
    for metric, estimate in estimates.items():
        name, _, suffix = metric.partition("@")
        suffix = f"@{suffix}" if suffix else ""
        scalars[keys.metric_key(structure, name, layer, suffix)] = estimate.value
        if estimate.stderr is not None:
            scalars[keys.stderr_key(structure, name, layer, suffix)] = estimate.stderr


__all__ = [
    "Estimate",
    "Replicates",
    "add_estimated_metrics",
    "estimated_metrics",
    "jackknife",
    "sum_replicates",
]
