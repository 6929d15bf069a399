"""``block``: the exact per-layer blocks of F and EF, through small Gram matrices.

With ``U = [g_1 … g_N]/√N`` and ``V`` the Fisher's square-root factor, ``EF_b = UUᵀ`` and
``F_b = VVᵀ``; no ``D × D`` matrix is formed unless the layer is smaller than the factors'
rank (then the dense blocks are cheaper). For the exact Fisher the per-sample gradients
are combinations of ``V``'s columns, ``U = VB``, with closed-form coefficients, and the
statistics use that identity (no ``1/λ`` cancellation); see
:func:`fisher_monitor.metrics.lowrank.lowrank_statistics`.

When the cost model (:mod:`fisher_monitor.engine.cost`) replaces the exact factor by a
sketch (:attr:`Block.sketch` set), the layer's statistics come with replicates for the
standard errors, from :func:`~fisher_monitor.estimators.block.sketched_block_replicates`
(``docs/theory.md#estimators``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fisher_monitor.curvature.factors import LayerFactors, MaterializedFactors
from fisher_monitor.metrics import dense_statistics, lowrank_statistics
from fisher_monitor.structures.base import (
    Directions,
    LayerInput,
    LayerResult,
    Structure,
    dense_directions,
    eigen_solve,
)

if TYPE_CHECKING:  # the estimators import the structures' base module
    from fisher_monitor.estimators import SketchDesign


def coefficient_grams(factors: LayerFactors, gram_v: Tensor, coefficients: Tensor):
    """``(K_U, K_UV) = (BᵀK_VB, BᵀK_V)`` as gathers over the block-sparse ``B``.

    Column ``n`` of ``B`` holds sample ``n``'s ``β`` at rows ``r·N + n``.
    """
    n = factors.num_samples
    beta = coefficients.view(-1, n, n).diagonal(dim1=1, dim2=2)  # (R_n, N)
    columns = beta.shape[0]
    gram_uv = torch.einsum("rn,rnk->nk", beta, gram_v.view(columns, n, -1))
    gram_u = torch.einsum("nrm,rm->nm", gram_uv.view(n, columns, n), beta)
    return gram_u, gram_uv


class Block(Structure):
    """Exact per-layer blocks of F and EF.

    Attributes:
        sketch: The sketch of the pass when the Fisher's factor is estimated (set by the
            engine), else ``None``.
    """

    name = "block"

    def __init__(self) -> None:
        self.sketch: SketchDesign | None = None

    def estimate_from(self, sketch: SketchDesign | None) -> None:
        """Estimate from a sketched pass (``None``: exact)."""
        self.sketch = sketch

    def layer(self, layer: LayerInput, directions: bool = False) -> LayerResult:  # noqa: D102
        factors = layer.require_factors()
        if self.sketch is not None:
            return _sketched(layer, factors, self.sketch)
        dampings = layer.dampings
        if factors.prefers_dense():
            fisher, empirical, gradient = layer.dense_blocks()
            statistics = dense_statistics(fisher, empirical, gradient, dampings)
            found = dense_directions(fisher, empirical, gradient, dampings) if directions else None
            return LayerResult(statistics, found)
        gram_v = factors.gram_v()
        coefficients = factors.coefficient_matrix()
        if coefficients is not None:
            gram_u, gram_uv = coefficient_grams(factors, gram_v, coefficients)
            layer.cached("gram_u", lambda: gram_u)
        else:
            gram_u, gram_uv = layer.gram_u(), factors.gram_uv()
        statistics = lowrank_statistics(
            gram_u, gram_v, gram_uv, factors.dimension, dampings, coefficients=coefficients
        )
        found = None
        if directions:
            found = _lowrank_directions(layer, factors, gram_v, gram_uv, coefficients)
        return LayerResult(statistics, found)


def _sketched(layer: LayerInput, factors: LayerFactors, sketch: SketchDesign) -> LayerResult:
    """Replicate statistics from a sketched factor; no ``A⁻¹g`` (it needs the exact Fisher)."""
    from fisher_monitor.estimators import EstimatedResult, sketched_block_replicates

    replicates, _ = sketched_block_replicates(
        factors, _gram_u(layer, factors), layer.dampings, sketch.groups, sketch.relative_damping
    )
    return EstimatedResult(replicates.full, None, replicates)


def _gram_u(layer: LayerInput, factors: LayerFactors) -> Tensor:
    """``K_U = UᵀU``, without converting a materialised factor's sketched columns.

    ``MaterializedFactors.gram_u`` casts ``U`` and ``V`` to float64 together; under a sketch
    only ``U`` (already float64: the per-sample gradients) is needed.
    """

    def compute() -> Tensor:
        if isinstance(factors, MaterializedFactors):
            u = factors.per_sample.to(factors.dtype)
            return u @ u.T / factors.num_samples
        return factors.gram_u()

    return layer.cached("gram_u", compute)


def _lowrank_directions(
    layer: LayerInput,
    factors: LayerFactors,
    gram_v: Tensor,
    gram_uv: Tensor,
    coefficients: Tensor | None,
) -> Directions:
    """``(A⁻¹g, B⁻¹g)`` per damping as explicit vectors.

    ``A⁻¹g = V(λI + K_V)⁻¹Ba`` when ``U = VB`` (push-through identity), else
    ``(g − V(λI + K_V)⁻¹Vᵀg)/λ`` (Woodbury); ``B⁻¹g = U(λI + K_U)⁻¹a``.
    """
    n = factors.num_samples
    a = torch.full((n,), n**-0.5, dtype=gram_v.dtype, device=gram_v.device)
    found = []
    for damping, solve in zip(layer.dampings, layer.empirical_solves(), strict=True):
        if coefficients is not None:
            natural = factors.v_combination(eigen_solve(gram_v, coefficients @ a, damping))
        else:
            c = eigen_solve(gram_v, gram_uv.T @ a, damping)
            natural = (layer.gradient - factors.v_combination(c)) / damping
        found.append((natural, factors.u_combination(solve.coefficients)))
    return found
