"""The ``diag`` structure from a sketched pass: replicate statistics of ``diag F̂``.

With the group diagonals ``d_g = diag(V̂_gV̂_gᵀ)`` (:func:`group_fisher_diagonals`), the
full estimate is ``f̂ = Σ_g d_g`` and the leave-one-group-out estimates are
``f̂_(i) = (G/(G − 1)) Σ_{g ≠ i} d_g``; each is unbiased for ``diag F``, and ``Σ_i f_i²`` is
estimated by the U-statistic over distinct groups. The empirical side (``diag EF``, ``g``)
is exact: the observed residual travels with the sketched columns. Each replicate gets the
ordinary diagonal statistics (:func:`~.statistics.diagonal_statistics`) with its own
relative damping ``λ_(i) = damping · tr F̂_(i) / D``, and the jackknife of
:mod:`~fisher_monitor.estimators.jackknife` turns them into metrics with standard errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from fisher_monitor.estimators import (
    Replicates,
    consistent_squares,
    pair_means,
    replicate_dampings,
    replicate_weights,
)
from fisher_monitor.factors import (
    LayerFactors,
    MaterializedFactors,
    OuterProductFactors,
    WeightSharingFactors,
)
from fisher_monitor.structures.diag.statistics import diagonal_statistics


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


def group_fisher_diagonals(factors: LayerFactors, groups: int) -> Tensor:
    """``diag(V̂_g V̂_gᵀ)`` for each replicate group, ``(G, D)`` in ``named_parameters`` order.

    The rows add up to ``diag F̂``; row ``g`` times ``G`` is the group's own unbiased
    estimate of ``diag F``. Computed in the factors' ``dtype`` (float64 by default).

    Args:
        factors: A layer's factors from a sketched pass (``R_n = G·m`` columns per sample).
        groups: ``G``.

    Returns:
        The group diagonals.

    Raises:
        TypeError: For a factor type without a known column layout.
    """
    dtype = factors.dtype
    if isinstance(factors, OuterProductFactors):
        # sums of squares without amplification: in the network's type, like diagonals()
        inputs, _, sqrt = factors.raw
        columns, n, outputs = sqrt.shape
        squares = sqrt.reshape(groups, columns // groups, n, outputs).square().sum(1)
        matrices = squares.transpose(1, 2) @ inputs.to(sqrt.dtype).square()  # (G, O, I)
        result = torch.empty(groups, factors.dimension, dtype=dtype, device=sqrt.device)
        weights = factors.weight_columns
        if weights and factors.transposed_weight:
            result[:, : outputs * weights].view(groups, weights, outputs).copy_(
                matrices[..., :weights].mT
            )
        elif weights:
            result[:, : outputs * weights].view(groups, outputs, weights).copy_(
                matrices[..., :weights]
            )
        if factors.has_bias:
            result[:, outputs * weights :].copy_(matrices[..., weights])
        return result
    if isinstance(factors, WeightSharingFactors):
        sqrt = factors.sqrt_at_output  # (R_n, N, T, O)
        size = sqrt.shape[0] // groups
        rows = []
        for g in range(groups):
            part = WeightSharingFactors(
                factors.inputs,
                factors.output_grads,
                sqrt[g * size : (g + 1) * size],
                factors.weight_columns,
                factors.has_bias,
                dtype,
            )
            part.transposed_weight = factors.transposed_weight
            rows.append(part.diagonals()[0].to(dtype))
        return torch.stack(rows)
    if isinstance(factors, MaterializedFactors):
        sqrt = factors.sqrt  # (R_n·N, D), column (j, n) at row j·N + n
        return _row_squares(sqrt.reshape(groups, -1, sqrt.shape[-1])).to(dtype)
    raise TypeError(
        f"Cannot split the sketched columns of {type(factors).__name__} into replicate groups."
    )


def _row_squares(rows: Tensor) -> Tensor:
    """``Σ_r rows[:, r]²`` for ``(G, rows, D)``, accumulated row by row in place.

    Squaring the whole tensor first allocates its size again; for the wide layers of a
    ``torch.func`` measurement (an embedding, a vocabulary-sized head) that costs ten times
    more than the arithmetic.
    """
    total = rows[:, 0] * rows[:, 0]
    for index in range(1, rows.shape[1]):
        total.addcmul_(rows[:, index], rows[:, index])
    return total


__all__ = ["group_fisher_diagonals", "sketched_diagonal_replicates"]
