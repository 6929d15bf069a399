"""The ``block`` structure from a sketched pass: replicate statistics of ``F̂_b``.

The sketch's factor ``V̂`` has ``k·N`` columns ``v_c``, ``c = (j, n)``: column ``j`` of
sample ``n``, ``E[v_c v_cᵀ] = F_n/(N·k)`` with ``F_n = J_nᵀH_nJ_n``, independent across
``c`` (independent signs). Every statistic the sketch can estimate without bias is linear
or quadratic in ``F`` and comes from the Gram matrix ``K = V̂ᵀV̂`` (small whatever the
number of classes) and the exact EF side. For a replicate that keeps the columns of a set
of groups, ``k_S`` columns per sample, scaled by ``a = k/k_S`` so that
``F̂_S = a Σ_{c∈S} v_c v_cᵀ`` is unbiased:

    tr F̂_S          = a Σ_{c∈S} K_cc
    ⟨EF, F̂_S⟩_F     = a Σ_{c∈S} ‖Uᵀv_c‖²
    ‖F‖²_F  ≈  a² [ Σ_{c≠c'∈S} K_cc'² + Σ_n Σ_{j≠j'∈S} K_(j,n),(j',n)² / (k_S − 1) ]

The last is unbiased: ``E K_cc'² = ⟨E v_cv_cᵀ, E v_c'v_c'ᵀ⟩`` for distinct (independent)
columns, and the missing terms ``c = c'`` (``E‖v_c‖⁴`` is not ``‖E v_cv_cᵀ‖²``) are
replaced by the same sample's pairs of distinct columns, which have that expectation. The
plug-in ``‖F̂_S‖²`` would instead carry the columns' own noise, which dominates when the
sketch has far lower rank than ``F`` (many classes), far beyond what the jackknife's
first-order correction removes; and a U-statistic over pairs of whole groups would throw
away the pairs of distinct samples within a group, the most numerous. The estimate is kept
at or above ``⟨EF, F̂_S⟩²/‖EF‖²`` (Cauchy-Schwarz), so that every replicate's metrics stay
in their ranges.

The EF side (``tr EF``, ``‖EF‖²_F``, ``‖g‖²`` and, per damping, ``B⁻¹g`` with
``ef_projection``, ``ef_grad_cosine``, ``ef_projection_per_sample``) is exact, except for
the relative damping ``λ_b``, which follows ``tr F̂_b`` in every replicate.

What the sketch cannot estimate is anything that needs ``(F + λI)⁻¹`` of the exact Fisher
(``kl``, ``direction_cosine``, ``nat_grad_cosine``, ``nat_projection``): ``F̂`` has rank at
most ``k·N`` where ``F`` has rank up to ``(C − 1)·N``, and ``(F̂ + λI)⁻¹`` sees ``1/λ`` in
every direction the sketch missed — a bias of the order of the metric itself, which no
standard error would show. Those metrics are left out (see ``docs/theory.md#estimators``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fisher_monitor.estimators import (
    Replicates,
    consistent_squares,
    replicate_dampings,
    replicate_weights,
)
from fisher_monitor.factors import LayerFactors, MaterializedFactors, OuterProductFactors
from fisher_monitor.metrics import DampedStatistics, LayerStatistics
from fisher_monitor.structures.empirical import empirical_solves

#: Metrics that need ``(F + λI)⁻¹`` of the exact Fisher: not estimated from a sketch.
FISHER_INVERSE_METRICS: frozenset[str] = frozenset(
    {"kl", "direction_cosine", "nat_grad_cosine", "nat_projection"}
)


@dataclass
class ColumnStatistics:
    """What the replicates need from the sketch's Gram matrix, per sketched column index.

    With ``K`` the Gram matrix of the columns ``v_(j,n)`` (``k`` column indices ``j`` per
    sample) and ``K^{jj'}`` its ``N × N`` block of indices ``j`` and ``j'``:

    Attributes:
        traces: ``Σ_n K_(j,n),(j,n)`` per ``j``, ``(k,)``.
        inner: ``Σ_n ‖Uᵀv_(j,n)‖²`` per ``j``, ``(k,)``.
        blocks: ``‖K^{jj'}‖²_F``, ``(k, k)``.
        same_sample: ``Σ_n K_(j,n),(j',n)²``, ``(k, k)`` (its diagonal: the self-pairs).
    """

    traces: Tensor
    inner: Tensor
    blocks: Tensor
    same_sample: Tensor


def gram_column_statistics(gram_v: Tensor, gram_uv: Tensor, columns: int) -> ColumnStatistics:
    """:class:`ColumnStatistics` from the whole Gram matrices (any factor type).

    Args:
        gram_v: ``K = V̂ᵀV̂`` (``k·N × k·N``, column ``(j, n)`` at row ``j·N + n``).
        gram_uv: ``UᵀV̂`` (``N × k·N``).
        columns: ``k``.
    """
    wide = torch.float64
    n = gram_v.shape[0] // columns
    blocks = gram_v.reshape(columns, n, columns, n)
    same = blocks.diagonal(dim1=1, dim2=3)  # (k, k, N): K_(j,n),(j',n)
    return ColumnStatistics(
        traces=same.diagonal(dim1=0, dim2=1).sum(dim=0, dtype=wide),
        inner=gram_uv.reshape(-1, columns, n).square().sum(dim=(0, 2), dtype=wide),
        blocks=blocks.square().sum(dim=(1, 3), dtype=wide),
        same_sample=same.square().sum(dim=2, dtype=wide),
    )


def outer_product_column_statistics(factors: OuterProductFactors) -> ColumnStatistics:
    """:class:`ColumnStatistics` of a ``Linear`` layer's sketch, block by block.

    ``K_(j,n),(j',m) = (s_{j,n}·s_{j',m})(x̃_n·x̃_m)`` and
    ``(Uᵀv_(j,m))_n = (δ_n·s_{j,m})(x̃_n·x̃_m)/√N``; only the blocks ``j ≤ j'`` are formed
    (``K`` is symmetric). The products stay in the network's precision, about twice as
    fast as float64 on a CPU: the sketch needs only sums of squares of their entries,
    accumulated in float64, and no solve amplifies their rounding.
    """
    inputs, output_grads, sqrt = factors.raw
    dtype, wide = sqrt.dtype, torch.float64
    columns, n, outputs = sqrt.shape
    x = inputs.to(dtype)
    input_gram = x @ x.T
    flat = sqrt.reshape(columns * n, outputs)
    blocks = torch.zeros(columns, columns, dtype=wide, device=sqrt.device)
    same = torch.zeros(columns, columns, dtype=wide, device=sqrt.device)
    for j in range(columns):
        later = columns - j
        block = (flat[j * n : (j + 1) * n] @ flat[j * n :].T).view(n, later, n)
        block *= input_gram.view(n, 1, n)
        block.square_()
        row = block.sum(dim=(0, 2), dtype=wide)
        diagonal = block.diagonal(dim1=0, dim2=2).sum(dim=1, dtype=wide)
        blocks[j, j:], blocks[j:, j] = row, row
        same[j, j:], same[j:, j] = diagonal, diagonal
    norms = flat.square().sum(dim=1, dtype=wide).view(columns, n)
    traces = (norms * input_gram.diagonal().to(wide)).sum(dim=1)
    cross = (output_grads.to(dtype) @ flat.T).view(n, columns, n)
    cross *= input_gram.view(n, 1, n)
    inner = cross.square_().sum(dim=(0, 2), dtype=wide) / n
    return ColumnStatistics(traces, inner, blocks, same)


def replicate_squares(statistics: ColumnStatistics, groups: int) -> Tensor:
    """The unbiased ``‖F‖²_F`` of each replicate (module docstring), ``(G + 1,)``, full first.

    Args:
        statistics: Per column index.
        groups: ``G``; group ``g`` holds the column indices ``[g·m, (g + 1)·m)``.
    """
    columns = statistics.blocks.shape[0]
    keep = replicate_weights(groups, torch.float64, statistics.blocks.device) > 0  # (G+1, G)
    keep = keep.repeat_interleave(columns // groups, dim=1).to(torch.float64)  # (G+1, k)
    kept = keep.sum(dim=1)  # k_S
    self_pairs = statistics.same_sample.diagonal()
    distinct = torch.einsum("sj,jk,sk->s", keep, statistics.blocks, keep) - keep @ self_pairs
    same = torch.einsum("sj,jk,sk->s", keep, statistics.same_sample, keep) - keep @ self_pairs
    return (columns / kept) ** 2 * (distinct + same / (kept - 1))


def sketched_block_replicates(
    factors: LayerFactors,
    gram_u: Tensor,
    dampings: Sequence[float],
    groups: int,
    relative: bool,
) -> tuple[Replicates, list[list[float]]]:
    """Replicate statistics of the ``block`` structure for one layer (module docstring).

    Args:
        factors: The layer's factors from a sketched pass (``U`` exact).
        gram_u: ``K_U = UᵀU``.
        dampings: The layer's ``λ_b`` per damping value (from the full estimate).
        groups: ``G``.
        relative: Whether the damping is relative (recomputed per replicate).

    Returns:
        The replicates (metrics needing ``(F + λI)⁻¹`` marked unavailable) and the
        dampings each replicate used (full first).
    """
    columns = _column_statistics(factors)
    k = columns.traces.shape[0]
    dtype, device = gram_u.dtype, gram_u.device
    # F̂_S = (k/k_S) Σ_{c∈S} v_c v_cᵀ: group weights 1 (full) or G/(G − 1) (one group left out)
    weights = replicate_weights(groups, dtype, device).repeat_interleave(k // groups, dim=1)
    trace_f = weights @ columns.traces
    inner_f = weights @ columns.inner
    frob_ef = gram_u.square().sum()
    frob_f = consistent_squares(replicate_squares(columns, groups), inner_f, frob_ef)
    per_replicate = replicate_dampings(dampings, trace_f, relative)
    damped = _empirical_side(gram_u, per_replicate, factors.dimension)
    trace_ef = gram_u.diagonal().sum()
    replicates = [
        LayerStatistics(
            dimension=factors.dimension,
            trace_f=trace_f[index],
            trace_ef=trace_ef,
            frob_f_sq=frob_f[index],
            frob_ef_sq=frob_ef,
            inner=inner_f[index],
            frob_diff_sq=(frob_f[index] + frob_ef - 2 * inner_f[index]).clamp_min(0.0),
            damped=row,
        )
        for index, row in enumerate(damped)
    ]
    return (
        Replicates(replicates[0], replicates[1:], FISHER_INVERSE_METRICS),
        per_replicate,
    )


def _column_statistics(factors: LayerFactors) -> ColumnStatistics:
    """The sketch's :class:`ColumnStatistics`, by the cheapest route for the factor type."""
    k = factors.num_columns // factors.num_samples
    if isinstance(factors, OuterProductFactors):
        return outer_product_column_statistics(factors)
    if isinstance(factors, MaterializedFactors):
        # the columns in the network's type: no float64 copy of the whole R × D factor
        sqrt, per_sample = factors.sqrt, factors.per_sample.to(factors.sqrt.dtype)
        gram_v = sqrt @ sqrt.T
        gram_uv = per_sample @ sqrt.T / factors.num_samples**0.5
        return gram_column_statistics(gram_v, gram_uv, k)
    return gram_column_statistics(factors.gram_v(), factors.gram_uv(), k)


def _empirical_side(
    gram_u: Tensor, per_replicate: list[list[float]], dimension: int
) -> list[list[DampedStatistics]]:
    """Each replicate's damped statistics: the exact EF side at its dampings, no ``A⁻¹g``."""
    dtype, device = gram_u.dtype, gram_u.device
    n = gram_u.shape[0]
    a = torch.full((n,), n**-0.5, dtype=dtype, device=device)
    grad_sq = a @ gram_u @ a
    flat = [d for row in per_replicate for d in row]
    solves = iter(empirical_solves(gram_u, flat, dimension=dimension))
    nan = torch.tensor(float("nan"), dtype=dtype, device=device)
    return [
        [
            DampedStatistics(
                damping_mass=torch.as_tensor(damping * dimension, dtype=dtype, device=device),
                kl=nan,
                grad_sq=grad_sq,
                nat_sq=nan,
                ef_sq=solve.ef_sq,
                nat_ef=nan,
                nat_projection=nan,
                ef_projection=solve.ef_projection,
                ef_projection_per_sample=solve.per_sample,
            )
            for damping, solve in zip(row, solves, strict=False)  # solves: one stream
        ]
        for row in per_replicate
    ]


__all__ = [
    "FISHER_INVERSE_METRICS",
    "ColumnStatistics",
    "gram_column_statistics",
    "outer_product_column_statistics",
    "replicate_squares",
    "sketched_block_replicates",
]
