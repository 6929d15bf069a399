"""The sketch design: how many columns a sketched pass draws, in which replicate groups.

A sketched pass backpropagates ``k = G·m`` columns per sample, column ``j`` of sample
``n`` at index ``j·N + n`` of the factor ``V̂`` (``R = k·N`` columns, as for the exact
Fisher's ``R_n`` columns). Group ``g`` holds the columns ``j ∈ [g·m, (g + 1)·m)``, i.e.
the contiguous rows ``[g·m·N, (g + 1)·m·N)`` of every ``R × R`` Gram matrix. Each group's
``V̂_g`` carries the overall ``1/√k``, so ``F̂ = Σ_g V̂_g V̂_gᵀ`` and the group's own
unbiased estimate is ``F̂_g = G · V̂_g V̂_gᵀ``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SketchDesign:
    """How many sketched columns a pass draws, in how many replicate groups.

    Attributes:
        groups: ``G``, independent replicate groups (at least 3: every leave-one-group-out
            replicate needs two groups for its unbiased squared norms).
        columns_per_group: ``m``, sketched columns per sample in each group.
        relative_damping: Whether ``λ_b`` follows ``tr F̂_b`` (``damping_mode="relative"``),
            so that every replicate recomputes it from its own trace.
    """

    groups: int = 6
    columns_per_group: int = 1
    relative_damping: bool = True

    def __post_init__(self):
        if self.groups < 3:
            raise ValueError(
                f"A sketch needs at least 3 replicate groups (unbiased squared norms in every "
                f"leave-one-group-out replicate), got {self.groups!r}."
            )
        if self.columns_per_group < 1:
            raise ValueError(
                f"A sketch needs at least 1 column per group, got {self.columns_per_group!r}."
            )

    @property
    def columns(self) -> int:
        """``k = G·m`` sketched columns per sample."""
        return self.groups * self.columns_per_group


def replicate_weights(groups: int, dtype: torch.dtype, device=None) -> Tensor:
    """``(G + 1, G)`` weights of the groups in each replicate estimate of ``F``.

    Row 0 is the full estimate ``F̂ = Σ_g V̂_gV̂_gᵀ`` (weight 1 per group); row ``i + 1`` the
    estimate without group ``i``, ``F̂_(i) = (G/(G − 1)) Σ_{g ≠ i} V̂_gV̂_gᵀ``.
    """
    weights = torch.full((groups + 1, groups), groups / (groups - 1), dtype=dtype, device=device)
    weights[0] = 1.0
    index = torch.arange(groups, device=device)
    weights[index + 1, index] = 0.0
    return weights


def pair_means(pairs: Tensor) -> Tensor:
    """Mean of ``⟨F̂_g, F̂_h⟩`` over distinct groups, per replicate, ``(G + 1,)``.

    With ``pairs[g, h] = ⟨F̂_g, F̂_h⟩`` for the groups' own unbiased estimates ``F̂_g``
    (independent draws), ``E⟨F̂_g, F̂_h⟩ = ‖F‖²_F`` for ``g ≠ h``: the mean over the
    ``|S|(|S| − 1)`` ordered pairs of distinct groups in a replicate ``S`` is the
    U-statistic, an unbiased estimate of ``‖F‖²_F`` (the plug-in ``‖F̂_S‖²`` would add the
    groups' own noise, ``E‖F̂_g‖² = ‖F‖² + E‖F̂_g − F‖²``, which dominates when ``F̂_g``
    has far lower rank than ``F``). Full replicate first, then leaving out each group.
    """
    groups = pairs.shape[0]
    distinct = pairs - torch.diag_embed(pairs.diagonal())
    total = distinct.sum()
    without = total - 2.0 * distinct.sum(dim=1)
    full = total / (groups * (groups - 1))
    return torch.cat([full.reshape(1), without / ((groups - 1) * (groups - 2))])


def consistent_squares(squares: Tensor, inner: Tensor, empirical_squares: Tensor) -> Tensor:
    """An estimate of ``‖F‖²_F`` kept at or above ``⟨EF, F⟩²/‖EF‖²_F`` (Cauchy-Schwarz).

    Unbiased estimates of ``‖F‖²`` and ``⟨EF, F⟩`` may disagree by their noise; raising the
    first to the bound (where it falls below) keeps ``matrix_cosine ≤ 1`` and
    ``‖EF − F‖² ≥ 0`` in every replicate, as for a genuine matrix.
    """
    if float(empirical_squares) <= 0.0:
        return squares
    return torch.maximum(squares, inner.square() / empirical_squares)


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


__all__ = [
    "SketchDesign",
    "consistent_squares",
    "pair_means",
    "replicate_dampings",
    "replicate_weights",
]
