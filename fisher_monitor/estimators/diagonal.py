"""The ``diag`` structure from a sketched pass: replicate statistics of ``diag F̂``.

With the group diagonals ``d_g = diag(V̂_gV̂_gᵀ)`` (:func:`~fisher_monitor.estimators.groups.
group_fisher_diagonals`), the full estimate is ``f̂ = Σ_g d_g`` and the leave-one-group-out
estimates are ``f̂_(i) = (G/(G − 1)) Σ_{g ≠ i} d_g``; each is unbiased for ``diag F``, and
``Σ_i f_i²`` is estimated by the U-statistic over distinct groups. The
empirical side (``diag EF``, ``g``) is exact: the observed residual travels with the
sketched columns. Each replicate gets the ordinary diagonal statistics
(:func:`~fisher_monitor.metrics.diagonal_statistics`) with its own relative damping
``λ_(i) = damping · tr F̂_(i) / D``, and the jackknife of
:mod:`~fisher_monitor.estimators.replicates` turns them into metrics with standard errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from torch import Tensor

from fisher_monitor.estimators.groups import consistent_squares, pair_means, replicate_weights
from fisher_monitor.estimators.replicates import Replicates
from fisher_monitor.metrics import diagonal_statistics


def replicate_dampings(
    dampings: Sequence[float], traces: Tensor, relative: bool
) -> list[list[float]]:
    """``λ`` per replicate (full first) and damping value.

    In relative mode ``λ_(i) = λ · tr F̂_(i) / tr F̂``: the measurement's ``λ`` (computed
    from the full estimate's trace) rescaled to each replicate's trace, so that the
    damping's own sampling noise enters the standard errors. A trace that is zero or not
    finite (where the relative rule falls back to absolute values) keeps ``λ``.

    Args:
        dampings: The layer's ``λ_b`` per damping value (from the full estimate).
        traces: ``tr F̂`` per replicate, ``(G + 1,)``, full first.
        relative: Whether the damping is relative.
    """
    full = float(traces[0])
    if not relative or not (full > 0 and full == full and full != float("inf")):
        return [list(dampings) for _ in range(traces.shape[0])]
    return [[d * float(t) / full for d in dampings] for t in traces]


def sketched_diagonal_replicates(
    group_diagonals: Tensor,
    empirical: Tensor,
    gradient: Tensor,
    dampings: Sequence[float],
    relative: bool,
) -> tuple[Replicates, list[list[float]]]:
    """Replicate statistics of the ``diag`` structure for one layer.

    Args:
        group_diagonals: ``(G, D)`` ``diag(V̂_gV̂_gᵀ)``.
        empirical: ``diag EF`` (exact).
        gradient: The mean gradient (exact).
        dampings: The layer's ``λ_b`` per damping value.
        relative: Whether the damping is relative (recomputed per replicate).

    Returns:
        The replicates and the dampings each replicate used (full first).
    """
    groups = group_diagonals.shape[0]
    weights = replicate_weights(groups, group_diagonals.dtype, group_diagonals.device)
    traces = weights @ group_diagonals.sum(dim=1)
    per_replicate = replicate_dampings(dampings, traces, relative)
    full = group_diagonals.sum(dim=0)
    statistics = [diagonal_statistics(full, empirical, gradient, per_replicate[0])]
    scale = groups / (groups - 1)
    for index in range(groups):
        fisher = (full - group_diagonals[index]).mul_(scale)
        statistics.append(
            diagonal_statistics(fisher, empirical, gradient, per_replicate[index + 1])
        )
    # Σ_i f_i² by the U-statistic over distinct groups (F̂_g = G·d_g), as for the block
    pairs = groups**2 * (group_diagonals @ group_diagonals.T)
    squares = pair_means(pairs)
    unbiased = []
    for index, item in enumerate(statistics):
        frob_f = consistent_squares(squares[index], item.inner, item.frob_ef_sq)
        difference = (frob_f + item.frob_ef_sq - 2 * item.inner).clamp_min(0.0)
        unbiased.append(replace(item, frob_f_sq=frob_f, frob_diff_sq=difference))
    return Replicates(unbiased[0], unbiased[1:]), per_replicate


__all__ = ["replicate_dampings", "sketched_diagonal_replicates"]
