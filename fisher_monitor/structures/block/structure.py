"""``block``: the exact per-layer blocks of F and EF, through small Gram matrices.

With ``U = [g_1 … g_N]/√N`` and ``V`` the Fisher's square-root factor, ``EF_b = UUᵀ`` and
``F_b = VVᵀ``; no ``D × D`` matrix is formed unless the layer is smaller than the factors'
rank. For the exact Fisher the per-sample gradients are combinations of ``V``'s columns,
``U = VB``, with closed-form coefficients, and the statistics use that identity (no
``1/λ`` cancellation). Three routes compute the statistics, one module each:

- the *root route* (:mod:`~.root_route`), from singular value decompositions of the
  factors written in a small orthonormal basis: it keeps twice the digits of a Gram
  matrix, so a layer whose curvature spans many orders of magnitude (near-duplicate
  samples, inputs far below the bias' constant 1) stays right; taken wherever it is cheap
  (small layers, ``Linear`` layers with few inputs or outputs);
- the *dense route* (:mod:`~.dense_route`), from the ``D × D`` blocks, where they are
  smaller than the Gram matrices (a layer with fewer parameters than factor columns);
- the *Gram route* (:mod:`~.gram_route`) otherwise, with a numerical-health estimate: when
  rounding may have moved the damped statistics by more than 10⁻³, the measurement's notes
  name the layer.

When the cost model (:mod:`fisher_monitor.engine.cost`) replaces the exact factor by a
sketch (:attr:`Block.sketch` set), the layer's statistics come with replicates for the
standard errors, from :func:`~.sketched.sketched_block_replicates`
(``docs/theory.md#estimators``); the metrics that need ``(F_b + λI)⁻¹`` then come from
the engine's exact-Fisher solves after the pass (:mod:`~.matrix_free`, when the cost model
set :attr:`Block.exact_solves`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fisher_monitor.factors import (
    CURVATURE_BYTES,
    RATES,
    LayerFactors,
    LayerShape,
    MaterializedFactors,
    OuterProductFactors,
    PassSize,
    form_of,
)
from fisher_monitor.linalg import damped_solver
from fisher_monitor.metrics import NumericalError, finalize
from fisher_monitor.structures.base import (
    Directions,
    LayerInput,
    LayerResult,
    Structure,
    dense_directions,
)
from fisher_monitor.structures.block.dense_route import (
    dense_statistics,
    factored_dense_statistics,
)
from fisher_monitor.structures.block.gram_route import (
    SHADOW_MAX_COLUMNS,
    SPECTRAL_MIN_DAMPINGS,
    coefficient_grams,
    gram_block_statistics,
)
from fisher_monitor.structures.block.matrix_free import deferred_block
from fisher_monitor.structures.block.mixed import MIXED_MIN_COLUMNS, mixed_gram_statistics
from fisher_monitor.structures.block.root_route import (
    outer_product_roots,
    prefer_root_route,
    root_block_statistics,
)
from fisher_monitor.structures.block.sketched import (
    FISHER_INVERSE_METRICS,
    sketched_block_replicates,
)
from fisher_monitor.structures.block.sums import BlockStatistics
from fisher_monitor.structures.fisher_solves import ExactSolves

#: ``R × R`` matrices alive in the Gram route (Grams, factorisations, solves).
GRAM_COPIES = 8
#: ``D × D`` matrices alive in the dense route.
DENSE_COPIES = 6


class Block(ExactSolves, Structure):
    """Exact per-layer blocks of F and EF (see the module docstring).

    Args:
        sketch: The sketch of the pass when the Fisher's factor is estimated, else ``None``.
    """

    name = "block"
    sketch_unavailable = FISHER_INVERSE_METRICS
    solved_metrics = FISHER_INVERSE_METRICS

    def layer(self, layer: LayerInput, directions: bool = False) -> LayerResult:  # noqa: D102
        factors = layer.require_factors()
        if self.sketch is not None:
            return _sketched(layer, factors, self.sketch, self.exact_solves, directions)
        block = _root_route(layer, factors)
        if block is not None:
            # the R × R Gram matrices are formed only if the directions need them
            found = _root_route_directions(layer, factors) if directions else None
            return LayerResult(block.statistics, found, block.health)
        if factors.prefers_dense():
            return _dense_route(layer, factors, directions)
        block = mixed_gram_statistics(layer, factors)
        if block is None:
            block = _checked_root_route(layer, factors)
            if block is not None:
                found = _root_route_directions(layer, factors) if directions else None
                return LayerResult(block.statistics, found, block.health)
        grams = None  # the mixed route's, formed below only if the directions need them
        if block is None:
            grams = _grams(layer, factors)
            block = gram_block_statistics(
                *grams,
                factors.dimension,
                layer.dampings,
                coefficients=factors.coefficient_matrix(),
                empirical=layer.empirical_solves(),
                length=factors.gram_length(),
            )
        root = None if _in_range(layer, block) else _root_route(layer, factors, MAX_ROOT_WORK)
        if root is not None:
            found = _root_route_directions(layer, factors) if directions else None
            return LayerResult(root.statistics, found, root.health)
        found = None
        if directions:
            if grams is None:
                grams = (layer.gram_u(), None, layer.cached("gram_uv", factors.gram_uv))
            found = _lowrank_directions(layer, factors, grams, block.natural)
        return LayerResult(block.statistics, found, block.health)

    def flops(self, shape: LayerShape, size: PassSize) -> float:
        """The route the layer will take, in the units of :class:`~fisher_monitor.factors.Rates`.

        The dense route where ``D × D`` blocks are smaller (Cholesky factorisations of
        ``F + λI`` with the ``N × N`` EF side, or two eigendecompositions), the root route's
        SVDs where they are small, else the Gram route: ``K_V`` (in float32 where
        :func:`~.mixed.mixed_precision_applies` would let it), one Cholesky factorisation
        and triangular inverse per damping (one eigendecomposition for five or more), and
        the rounding probe's rerun up to :data:`~.gram_route.SHADOW_MAX_COLUMNS` columns.
        """
        d, r, n = float(shape.dimension), float(size.rank), float(size.samples)
        form = form_of(shape)
        if size.exact and size.prefers_dense(shape):
            return _dense_flops(shape, size)
        if size.exact and _cheap_root(shape, size):
            columns, rows = r, min(n, float(shape.inputs)) * min(float(shape.outputs), r)
            if shape.form != "outer":
                rows = d
            big, small = max(rows, columns), min(rows, columns)
            return 2.0 * RATES.svd64 * big * small * small
        kv = form.gram_v_flops(shape, size)
        rest = form.gram_flops(shape, size) - RATES.gemm64 * kv  # K_UV and K_U
        if size.dampings >= SPECTRAL_MIN_DAMPINGS:
            return RATES.gemm64 * kv + rest + RATES.eigh64 * r**3
        if size.exact and form.mixed_precision and r >= MIXED_MIN_COLUMNS:
            refine = 8.0 * RATES.gemm64 * form.product_flops(shape, size) + 24.0 * r * r
            factor = RATES.cholesky32 * r**3 / 3 + RATES.inverse32 * 2 * r**3 / 3
            return kv + rest + size.dampings * (factor + refine + 12.0 * RATES.entry * r * r)
        factor = RATES.cholesky64 * r**3 / 3 + RATES.inverse64 * 2 * r**3 / 3
        if r <= SHADOW_MAX_COLUMNS:  # the rounding probe reruns it in float32
            factor += RATES.cholesky32 * r**3 / 3 + RATES.inverse32 * 2 * r**3 / 3
        return RATES.gemm64 * kv + rest + size.dampings * (factor + 12.0 * RATES.entry * r * r)

    def peak_bytes(self, shape: LayerShape, size: PassSize) -> int:  # noqa: D102
        d, dim, n, r = CURVATURE_BYTES, shape.dimension, size.samples, size.rank
        if size.prefers_dense(shape):  # the dense blocks and the materialised columns
            return DENSE_COPIES * dim * dim * d + (r + n) * dim * d
        return GRAM_COPIES * r * r * d + form_of(shape).gram_bytes(shape, size)


def _dense_flops(shape: LayerShape, size: PassSize) -> float:
    """Work of the dense route (see :func:`_dense_route`)."""
    d, r, n = float(shape.dimension), float(size.rank), float(size.samples)
    if n < d and size.dampings < SPECTRAL_MIN_DAMPINGS:
        factor = RATES.cholesky64 * d**3 / 3 + RATES.inverse64 * 2 * d**3 / 3
        per_damping = factor + RATES.gemm64 * 2.0 * d * d * n
        empirical = RATES.gemm64 * n * n * d + RATES.cholesky64 * n**3
        return (
            form_of(shape).fisher_block_flops(shape, size) + empirical + size.dampings * per_damping
        )
    return RATES.gemm64 * 2.0 * (max(r, n) + n) * d * d + 2.0 * RATES.eigh64 * d**3


def _cheap_root(shape: LayerShape, size: PassSize) -> bool:
    """Whether the root route's SVD is taken directly (see :func:`_root_route`)."""
    columns = size.rank
    if shape.form == "outer":
        rows = min(size.samples, shape.inputs) * min(shape.outputs, columns)
        return prefer_root_route(rows, columns)
    if shape.form == "materialised":
        rows = shape.dimension
        return rows * columns * min(rows, columns) <= MATERIALIZED_CHEAP_ROOT
    return False


def _dense_route(layer: LayerInput, factors: LayerFactors, directions: bool) -> LayerResult:
    """``D × D`` blocks: Cholesky with the ``N × N`` EF side where ``N < D`` and few dampings."""
    if factors.num_samples < factors.dimension and len(layer.dampings) < SPECTRAL_MIN_DAMPINGS:
        samples = factors.sample_columns()
        found = factored_dense_statistics(
            factors.fisher_block(),
            samples,
            layer.gradient,
            layer.dampings,
            layer.empirical_solves(),
            layer.gram_u(),
        )
        if found is not None:
            statistics, natural = found
            pairs = None
            if directions:
                solves = zip(natural, layer.empirical_solves(), strict=True)
                pairs = [(nat, samples @ ef.coefficients) for nat, ef in solves]
            return LayerResult(statistics, pairs)
    fisher, empirical, gradient = layer.dense_blocks()
    statistics = dense_statistics(fisher, empirical, gradient, layer.dampings)
    found = dense_directions(fisher, empirical, gradient, layer.dampings) if directions else None
    return LayerResult(statistics, found)


def _grams(layer: LayerInput, factors: LayerFactors) -> tuple[Tensor, Tensor, Tensor]:
    """``(K_U, K_V, K_UV)``, with ``K_U = BᵀK_VB`` and ``K_UV = BᵀK_V`` when ``U = VB``.

    Cached on the layer (kron's EF side uses the same ``K_U``).
    """

    def compute() -> tuple[Tensor, Tensor, Tensor]:
        gram_v = factors.gram_v()
        coefficients = factors.coefficient_matrix()
        if coefficients is None:
            return layer.gram_u(), gram_v, factors.gram_uv()
        gram_u, gram_uv = coefficient_grams(factors, gram_v, coefficients)
        layer.cached("gram_u", lambda: gram_u)
        return gram_u, gram_v, gram_uv

    return layer.cached("grams", compute)


#: Multiply-adds up to which a materialised factor (``D × R``, already formed) takes the root
#: route directly: its SVD costs several times forming the Gram matrix ``VᵀV``, so larger
#: layers take the Gram route and fall back to their SVD only where its rounding estimate
#: exceeds :data:`ROOT_RETRY_HEALTH` (while ``D·R·min(D, R)`` stays below
#: :data:`MAX_ROOT_WORK`).
MATERIALIZED_CHEAP_ROOT = 2**24
#: Multiply-adds (``k·R·min(k, R)``) up to which a layer's SVD is affordable at all, where
#: the Gram route's result needs redoing (:func:`_in_range`, :data:`ROOT_RETRY_HEALTH`).
MAX_ROOT_WORK = 2e9
#: A materialised layer's Gram route whose rounding estimate exceeds this is redone by the
#: root route where affordable (the root route keeps twice the digits).
ROOT_RETRY_HEALTH = 1e-6


def _checked_root_route(layer: LayerInput, factors: LayerFactors) -> BlockStatistics | None:
    """The float64 Gram route of a materialised layer, or its root route where that is safer.

    Safer where the Gram route's rounding estimate exceeds :data:`ROOT_RETRY_HEALTH` or a
    metric left its range (:func:`_in_range`). ``None`` for other layers (the caller's Gram
    route then runs).
    """
    if not isinstance(factors, MaterializedFactors) or factors.prefers_dense():
        return None
    grams = _grams(layer, factors)
    block = gram_block_statistics(
        *grams,
        factors.dimension,
        layer.dampings,
        coefficients=factors.coefficient_matrix(),
        empirical=layer.empirical_solves(),
        length=factors.gram_length(),
    )
    if float(block.health.relative_error) <= ROOT_RETRY_HEALTH and _in_range(layer, block):
        return block
    root = _root_route(layer, factors, MAX_ROOT_WORK)
    return root if root is not None else block


def _in_range(layer: LayerInput, block: BlockStatistics) -> bool:
    """Whether every metric of the Gram route's ``block`` lies within its range.

    A Gram matrix squares its factors' entries, so where a layer's scales lie further apart
    than float64 holds (a bias column of ones beside inputs of 2e-10: ``x̃ᵀx̃' = 1 + 4e-17``)
    the Gram route loses what the root route, working on the factors themselves, keeps.
    The rounding estimate does not always see it; a cosine above one (Cauchy–Schwarz) or a
    negative squared norm beyond rounding proves it (:func:`~fisher_monitor.metrics.
    finalize`'s range check). The callers redo such a layer by the root route wherever its
    SVD is affordable (``k·R·min(k, R) ≤`` :data:`MAX_ROOT_WORK`); elsewhere ``block``
    stays, and the measurement fails with the range check's message as before.
    """
    try:
        finalize(block.statistics, layer.dampings, f"block/{layer.info.name}")
    except NumericalError:
        return False
    return True


def _root_route(
    layer: LayerInput, factors: LayerFactors, work: float = MATERIALIZED_CHEAP_ROOT
) -> BlockStatistics | None:
    """The root route's statistics where its SVD is cheap, else ``None``.

    ``Linear`` layers on ``(N, I)`` inputs are written in the ``min(N, I)·min(O, R)``
    coordinates of :func:`~fisher_monitor.structures.block.root_route.outer_product_roots`;
    materialised layers (the ``torch.func`` backend, BackPACK's other layer types) in their
    own parameters. Either while ``k·R·min(k, R)`` (``k`` those coordinates) stays below
    ``work`` (:data:`MATERIALIZED_CHEAP_ROOT`, what :func:`~fisher_monitor.structures.
    block.root_route.prefer_root_route` allows; larger materialised layers go through
    :func:`_checked_root_route`).
    """
    coefficients = factors.coefficient_matrix()
    columns = factors.num_columns + (0 if coefficients is not None else factors.num_samples)
    if isinstance(factors, OuterProductFactors):
        rows = min(factors.num_samples, factors.in_features) * min(factors.out_features, columns)
    elif isinstance(factors, MaterializedFactors):
        rows = factors.dimension
    else:
        return None
    if rows * columns * min(rows, columns) > work:
        return None
    if isinstance(factors, OuterProductFactors):
        grads = factors.output_grads if coefficients is None else None
        v_root, u_root = outer_product_roots(factors.inputs, factors.sqrt, grads)
    else:
        per_sample, sqrt = factors.columns()
        v_root, u_root = sqrt.T, per_sample.T / factors.num_samples**0.5
    if coefficients is not None:
        return root_block_statistics(
            v_root, factors.dimension, layer.dampings, coefficients=coefficients
        )
    return root_block_statistics(v_root, factors.dimension, layer.dampings, u_root=u_root)


def _sketched(
    layer: LayerInput, factors: LayerFactors, sketch, exact_solves: bool, directions: bool
) -> LayerResult:
    """Replicate statistics from a sketched factor.

    ``A⁻¹g`` needs the exact Fisher: with ``exact_solves`` the result is deferred to the
    engine's exact-Fisher solves (:mod:`~.matrix_free`), else those metrics are left out.
    """
    replicates, per_replicate = sketched_block_replicates(
        factors, _gram_u(layer, factors), layer.dampings, sketch.groups, sketch.relative_damping
    )
    if exact_solves:
        return deferred_block(layer, factors, replicates, per_replicate, directions)
    return LayerResult(replicates.full, None, replicates=replicates)


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


def _root_route_directions(layer: LayerInput, factors: LayerFactors) -> Directions:
    """Directions beside the root route's statistics.

    Dense solves where the layer is smaller than the factors' rank (a logistic regression
    on many samples), else through the Gram matrices.
    """
    if factors.prefers_dense():
        return dense_directions(*layer.dense_blocks(), layer.dampings)
    return _lowrank_directions(layer, factors, _grams(layer, factors))


def _lowrank_directions(
    layer: LayerInput,
    factors: LayerFactors,
    grams: tuple[Tensor, Tensor, Tensor],
    natural: list[Tensor] | None = None,
) -> Directions:
    """``(A⁻¹g, B⁻¹g)`` per damping as explicit vectors.

    ``A⁻¹g = V(λI + K_V)⁻¹Ba`` when ``U = VB`` (push-through identity), else
    ``(g − V(λI + K_V)⁻¹Vᵀg)/λ`` (Woodbury); ``B⁻¹g = U(λI + K_U)⁻¹a``. The statistics'
    own ``(λI + K_V)⁻¹Ba`` (``natural``) is used where they computed it; otherwise one
    factorisation of ``K_V`` serves every damping
    (:func:`~fisher_monitor.linalg.damped_solver`).
    """
    _, gram_v, gram_uv = grams
    coefficients = factors.coefficient_matrix()
    n = factors.num_samples
    a = torch.full((n,), n**-0.5, dtype=gram_uv.dtype, device=gram_uv.device)
    rhs = coefficients @ a if coefficients is not None else gram_uv.T @ a
    if natural is not None and coefficients is not None:
        solved = list(natural)  # (λI + K_V)⁻¹Ba per damping, from the statistics
    else:
        solve = damped_solver(gram_v, layer.dampings)
        solved = [solve(index, rhs) for index in range(len(layer.dampings))]
    found = []
    for c, damping, empirical in zip(solved, layer.dampings, layer.empirical_solves(), strict=True):
        if coefficients is not None:
            direction = factors.v_combination(c)
        else:
            direction = (layer.gradient - factors.v_combination(c)) / damping
        found.append((direction, factors.u_combination(empirical.coefficients)))
    return found
