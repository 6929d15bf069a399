"""The Gram route's coefficient path from the inverse of a Cholesky factor, in mixed precision.

With the exact Fisher's coefficients ``B`` (``U = VB``, block-sparse: column ``n`` holds
sample ``n``'s ``β`` at rows ``r·N + n``), ``b = Ba`` and ``A = λI + K_V = LLᵀ``, every
damped statistic follows from ``L⁻¹`` (one ``potrf`` and one ``trtri``, about ``2R³/3``
operations, in place in a reused buffer) and two solves:

- ``c₀ = A⁻¹b`` and ``c = A⁻¹K_Vb`` (``A⁻¹g = Vc₀``): ``gᵀA⁻¹g = b·c``, ``‖A⁻¹g‖² = c₀·c``,
  ``⟨A⁻¹g, B⁻¹g⟩ = c·(B e)``;
- ``tr(VᵀA⁻¹V) = R − λ‖L⁻¹‖²_F`` and ``tr(UᵀA⁻¹U) = ‖B‖²_F − λ‖L⁻¹B‖²_F`` (``L⁻¹B`` gathers
  ``R_n`` columns of ``L⁻¹`` per sample: ``O(R²)``, no triangular solve with ``2N`` right-hand
  sides), ``log det(I + K_V/λ) = 2 Σ log L_ii − R log λ``.

**Mixed precision.** ``K_V`` formed in float32 and factorised in float32 costs half as much
(and the kernels run at twice the rate). The solves are then refined in float64
(iterative refinement with the float32 factor, residuals from :meth:`~fisher_monitor.
factors.LayerFactors.gram_v_product`, ``K_Vw`` in float64 without forming ``K_V``), so the
direction metrics and projections are float64 numbers; the traces and the log-determinant
of the KL divergence, and ``‖K_V‖²_F``, keep the float32 factor's rounding, which the
rounding estimate below bounds. Where that estimate exceeds :data:`MIXED_TOLERANCE`, where
float32 cannot factorise ``λI + K_V`` or where the refinement does not converge,
:func:`factored_statistics` returns ``None`` and the caller redoes the layer in float64.

**Rounding estimate.** A Gram matrix formed from dot products of length ``L`` and
factorised by Cholesky carries a backward error ``E`` with entries about
``ζ √(A_ii A_jj)``, ``ζ = ε √(L + R)`` (:func:`rounding_level`): rounding relative to the
entries' own scale, so the columns of a nearly fitted sample (tiny ``K_ii``) keep their
digits. To first order a statistic ``q`` moves by ``⟨∇q, E⟩``, of typical size
``ζ ‖D^½ ∇q D^½‖_F`` (``D = diag A``), which the Jacobi-scaled inverse
``Â⁻¹ = D^½A⁻¹D^½`` makes computable: ``log det`` and ``λ tr A⁻¹`` move by about
``ζ‖Â⁻¹‖_F``, ``λ tr(BᵀA⁻¹B)`` by ``ζ‖Â⁻¹‖₂ λ‖L⁻¹B‖²``, the solves by
``‖A⁻¹Ec₀‖`` with ``xᵀEy ≈ ζ‖D^½x‖‖D^½y‖``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fisher_monitor.linalg import (
    InverseFactor,
    Workspace,
    current_workspace,
    inverse_cholesky_factor,
    relative,
    square_norm,
)
from fisher_monitor.metrics import DampedStatistics
from fisher_monitor.structures.block.sums import assemble_damped
from fisher_monitor.structures.empirical import EmpiricalSolve, mean_weights

#: Largest estimated relative error a float32 factorisation may leave in the KL
#: divergence's traces and log-determinant and in ``‖F − EF‖²_F``; above it the layer is
#: redone in float64. The estimate errs high (by 6–110× on the benchmarks' MLPs, at
#: initialisation and fitted), so the numbers kept carry four digits or more.
MIXED_TOLERANCE = 1e-4
#: Iterative-refinement steps at most (each: one float64 product with ``K_V``, two float32
#: triangular products).
REFINEMENT_STEPS = 10
#: A refinement that stalls above this relative correction did not converge.
REFINEMENT_STALL = 1e-10
#: Refined solves are as accurate as float64 ones: their rounding estimate is the float32
#: solve's measured error scaled by the ratio of the two precisions, times this margin.
REFINED_MARGIN = 4.0
#: Power-iteration steps for ``‖Â⁻¹‖₂`` (an estimate: a few digits suffice).
POWER_STEPS = 6

Product = Callable[[Tensor], Tensor]


def rounding_level(dtype: torch.dtype, length: int, size: int) -> float:
    """``ζ = ε √(L + R)``: the relative rounding of a Gram matrix's entries and its Cholesky.

    Dot products of length ``L`` accumulate rounding like a random walk, ``ε √L`` relative
    to ``‖v_i‖‖v_j‖``, and a Cholesky factorisation of order ``R`` adds about ``ε √R``
    relative to ``√(A_ii A_jj)``.
    """
    return torch.finfo(dtype).eps * math.sqrt(max(length, 1) + max(size, 1))


@dataclass
class Factored:
    """What :func:`factored_statistics` returns.

    Attributes:
        damped: One :class:`DampedStatistics` per damping.
        errors: The relative rounding estimates (see the module docstring).
        natural: ``c₀ = (λI + K_V)⁻¹Ba`` per damping (``A⁻¹g = Vc₀``).
        precision: The precision ``K_V`` was factorised in.
    """

    damped: list[DampedStatistics]
    errors: list[Tensor]
    natural: list[Tensor]
    precision: torch.dtype


def factored_statistics(
    gram_v: Tensor,
    gram_uv: Tensor,
    coefficients,
    dimension: int,
    dampings: Sequence[float],
    empirical: Sequence[EmpiricalSolve],
    *,
    diagonal: Tensor,
    length: int,
    product: Product | None = None,
    workspace: Workspace | None = None,
    probe: bool = False,
    estimate: bool = True,
) -> Factored | None:
    """The damped statistics of the coefficient path from ``L⁻¹`` (module docstring).

    Args:
        gram_v: ``K_V`` (``R × R``) in the precision to factorise it in (float32 needs
            ``product``), symmetric (its upper triangle is read).
        gram_uv: ``K_UV = BᵀK_V`` (``N × R``) in float64.
        coefficients: ``B`` (a :class:`~fisher_monitor.factors.CoefficientMatrix`).
        dimension: ``D``.
        dampings: Damping values λ (> 0).
        empirical: The EF-side solves, one per damping.
        diagonal: ``(K_V)_ii`` in float64 (the rounding estimate's scale).
        length: Length of the dot products ``K_V`` was formed from.
        product: ``w ↦ K_V w`` in float64, for the refinement (needed below float64).
        workspace: Where ``L⁻¹`` and the gathers live (default: the active one).
        probe: Compute in ``gram_v``'s precision as it is, without refinement, tolerance
            or rounding estimates (the rounding probe of :func:`shadow_errors`).
        estimate: Whether to estimate the rounding errors from the model (off where the
            caller probes them instead; the errors are then empty). Below float64 the
            KL's estimate is always made: it decides whether the precision suffices.

    Returns:
        The statistics, or ``None`` where this precision does not suffice (module
        docstring): the caller redoes the layer in float64.
    """
    workspace = workspace if workspace is not None else current_workspace()
    precision = gram_v.dtype
    mixed = precision != torch.float64 and not probe
    if mixed and product is None:
        raise ValueError("A factorisation below float64 needs the float64 product to refine.")
    n, r = gram_uv.shape
    a = mean_weights(n, gram_uv)
    b = coefficients @ a
    k_b = gram_uv.mT @ a  # K_V b
    rhs = torch.stack([b, k_b], dim=1)
    beta = getattr(coefficients, "by_column", coefficients)  # β (R_n × N), or a dense B
    beta_sq = beta.square().sum()
    damped, errors, natural = [], [], []
    for damping, ef in zip(dampings, empirical, strict=True):
        factor = inverse_cholesky_factor(gram_v, damping, workspace)
        if factor is None:
            return None
        solved = _solve(factor, rhs, product if mixed else None, damping)
        if solved is None:
            return None
        (c0, c), measured = solved[0].unbind(1), solved[1]
        projected = _block_sparse_norm(factor, beta, workspace)  # ‖L⁻¹B‖²_F
        trace_u, trace_v = beta_sq - damping * projected, r - damping * factor.trace_inverse()
        kl = 0.5 * (trace_u - trace_v + factor.logdet_ratio - ef.logdet_ratio)
        nat_projection = _nat_projection(factor, rhs, b, c, refined=mixed or probe)
        ef_direction = coefficients @ ef.coefficients  # B⁻¹g = V(Be)
        statistics = assemble_damped(
            damping, dimension, kl, b @ k_b, c0 @ c, c @ ef_direction, nat_projection, ef
        )
        damped.append(statistics)
        natural.append(c0)
        if probe or not (estimate or mixed):
            continue
        kl_terms = (kl, projected, beta_sq)
        found = _estimates(
            factor, diagonal, length, kl_terms, measured, statistics, c0, ef_direction
        )
        if found is None:
            return None
        errors += found
    return Factored(damped, errors, natural, precision)


def _estimates(
    factor, diagonal, length, kl_terms, measured, statistics, c0, ef_direction
) -> list | None:
    """One damping's rounding estimates from the model (module docstring).

    ``kl_terms`` are the KL, ``‖L⁻¹B‖²_F`` and ``‖β‖²``; ``statistics``, ``c₀`` and ``Be``
    serve the solves' estimates where the solve was not refined. ``None`` where a
    factorisation below float64 leaves the KL's error above :data:`MIXED_TOLERANCE`.
    """
    kl, projected, beta_sq = kl_terms
    precision, r, damping = factor.lower.dtype, factor.lower.shape[0], factor.damping
    scale = (diagonal + damping).sqrt()
    zeta = rounding_level(precision, length, r)
    kl_error = relative(_kl_error(factor, scale, zeta, precision, damping, projected, beta_sq), kl)
    if precision != torch.float64 and bool(kl_error > MIXED_TOLERANCE):
        return None
    if measured is not None:
        return [kl_error, _refined_error(measured, precision, kl.dtype)]
    zeta64 = rounding_level(torch.float64, length, r)
    solves = _solve_errors(factor, scale, c0, ef_direction, zeta64, damping, statistics)
    return [kl_error, *solves]


def _nat_projection(factor, rhs: Tensor, b: Tensor, c: Tensor, *, refined: bool) -> Tensor:
    """``gᵀ(F+λI)⁻¹g``: from the refined float64 solution, or by half solves."""
    if refined:  # float64 solutions of the refined system
        return b @ c
    half = factor.half_solve(rhs)  # (L⁻¹b)·(L⁻¹K_Vb): without the amplification of a full solve
    return half[:, 0] @ half[:, 1]


def _solve(
    factor: InverseFactor, rhs: Tensor, product: Product | None, damping: float
) -> tuple[Tensor, float | None] | None:
    """``(λI + K_V)⁻¹ rhs`` by the factor, refined in float64 where ``product`` is given.

    Returns the solutions and the refinement's measured error (``None`` without one), or
    ``None`` where the refinement fails.
    """
    x = factor.solve(rhs)
    if product is None:
        return x, None
    return _refine(factor, product, rhs, damping, x)


def _refined_error(measured, precision: torch.dtype, dtype: torch.dtype) -> Tensor:
    """The float32 solve's error, measured, scaled to float64's rounding."""
    eps_ratio = torch.finfo(torch.float64).eps / torch.finfo(precision).eps
    return torch.as_tensor(REFINED_MARGIN * eps_ratio * measured, dtype=dtype)


def _kl_error(factor, scale, zeta, precision, damping, projected, beta_sq) -> Tensor:
    """The rounding error of the KL from ``L⁻¹``'s Jacobi-scaled norms (module docstring)."""
    jacobi = _jacobi(factor, scale)
    return 0.5 * (
        zeta * (2.0 * jacobi.frobenius + jacobi.spectral * damping * projected)
        + torch.finfo(precision).eps * (beta_sq + damping * projected)
    )


#: The rounding probe's differences are scaled by this margin (:func:`shadow_errors`).
SHADOW_MARGIN = 15.0


def shadow_errors(
    reference: Sequence[DampedStatistics],
    empirical: Sequence[EmpiricalSolve],
    probe: Sequence[DampedStatistics],
    probe_empirical: Sequence[EmpiricalSolve],
    scale: float,
) -> list[Tensor]:
    """Rounding estimates from a rerun of the same computation under a known perturbation.

    To first order a result moves linearly with the rounding it was computed with, so the
    difference between the statistics and those of a rerun under a known perturbation,
    scaled by ``scale`` (the ratio of the two perturbations' sizes) and
    :data:`SHADOW_MARGIN`, estimates the float64 statistics' own error — with the
    sensitivities of this very problem, where a model of them can be far off in either
    direction. The cosines' errors are their terms' (the squared norms counting half).
    """
    errors = []
    pairs = zip(reference, empirical, probe, probe_empirical, strict=True)
    factor = scale * SHADOW_MARGIN
    for ours, ef, other, other_ef in pairs:

        def moved(value, other_value, like=None):
            size = value.abs() if like is None else like
            return relative((value - other_value.to(value.dtype)).abs() * factor, size)

        nat_sq, ef_sq = moved(ours.nat_sq, other.nat_sq), moved(ef.ef_sq, other_ef.ef_sq)
        cross = moved(ours.nat_ef, other.nat_ef, (ours.nat_sq * ef.ef_sq).clamp_min(0.0).sqrt())
        errors += [
            moved(ours.kl, other.kl),
            moved(ours.nat_projection, other.nat_projection) + 0.5 * nat_sq,
            cross + 0.5 * (nat_sq + ef_sq),
            moved(ef.ef_projection, other_ef.ef_projection) + 0.5 * ef_sq,
            moved(ef.per_sample, other_ef.per_sample),
        ]
    return errors


def frobenius_error(gram_v: Tensor, diagonal: Tensor, length: int) -> Tensor:
    """How far rounding may have moved ``‖K_V‖²_F`` formed in ``gram_v``'s precision.

    Each entry is off by about ``ζ √(K_ii K_jj)`` (random signs), so ``‖K‖²_F`` by about
    ``2ζ (Σ_ij K_ij² K_ii K_jj)^½ ≤ 2ζ ‖K‖_F max_i K_ii``.
    """
    zeta = rounding_level(gram_v.dtype, length, gram_v.shape[0])
    norm = square_norm(gram_v).sqrt()
    return 2.0 * zeta * norm * diagonal.max()


def _refine(
    factor: InverseFactor, product: Product, rhs: Tensor, damping: float, x: Tensor
) -> tuple[Tensor, float] | None:
    """Iterative refinement of ``(λI + K_V) x = rhs`` in float64 with the float32 factor.

    Stops once a correction is at float64's rounding, or once the next one would be: the
    corrections shrink geometrically (by the float32 factor's relative error), so after
    corrections ``δ₁, δ₂`` the remaining error is about ``δ₂²/δ₁``, and at float64's rounding
    the step that would only confirm it is saved. Stops too where the corrections stall (the
    float64 residual's own rounding); ``None`` when they stall above
    :data:`REFINEMENT_STALL` or diverge.

    Returns:
        The refined solution and the first correction relative to it (the float32
        solve's error, measured).
    """
    eps = torch.finfo(torch.float64).eps
    previous, first = math.inf, None
    for _ in range(REFINEMENT_STEPS):
        residual = rhs - damping * x - product(x)
        correction = factor.solve(residual)
        x = x + correction
        size = float(
            (
                torch.linalg.vector_norm(correction, dim=0)
                / torch.linalg.vector_norm(x, dim=0).clamp_min(torch.finfo(x.dtype).tiny)
            ).max()
        )
        first = size if first is None else first
        if size <= 8.0 * eps or (previous < math.inf and size * size / previous <= eps):
            return x, first
        if size > 0.5 * previous:  # stalled: accept only at the float64 floor
            return (x, first) if size <= REFINEMENT_STALL else None
        previous = size
    return (x, first) if previous <= REFINEMENT_STALL else None


def _block_sparse_norm(factor: InverseFactor, beta: Tensor, workspace: Workspace) -> Tensor:
    """``‖L⁻¹B‖²_F``: column ``n`` of ``L⁻¹B`` is ``Σ_r β_{r,n} L⁻¹[:, r·N + n]``.

    ``beta`` is ``β`` (``R_n × N``) of a block-sparse ``B``, or a dense ``B`` (``R × N``).
    """
    inverse = factor.inverse
    if beta.shape[0] == inverse.shape[0]:  # a dense B
        product = inverse @ beta.to(inverse.dtype)
        return square_norm(product)
    columns, n = beta.shape
    blocks = inverse.view(inverse.shape[0], columns, n)
    weights = beta.to(inverse.dtype)
    gathered = workspace.take("block-sparse", (inverse.shape[0], n), inverse.dtype, inverse.device)
    torch.mul(blocks[:, 0], weights[0], out=gathered)
    for row in range(1, columns):
        gathered.addcmul_(blocks[:, row], weights[row])
    return square_norm(gathered)


@dataclass
class _Jacobi:
    """Norms of the Jacobi-scaled inverse ``Â⁻¹ = D^½A⁻¹D^½``.

    Attributes:
        trace: ``tr Â⁻¹ = Σ_i A_ii (A⁻¹)_ii``.
        spectral: ``‖Â⁻¹‖₂`` (power iteration, at least ``tr Â⁻¹ / R``).
        frobenius: ``(‖Â⁻¹‖₂ tr Â⁻¹)^½``, between ``‖Â⁻¹‖_F`` and ``tr Â⁻¹``.
    """

    trace: Tensor
    spectral: Tensor
    frobenius: Tensor


def _jacobi(factor: InverseFactor, scale: Tensor) -> _Jacobi:
    """``tr Â⁻¹`` from ``L⁻¹``'s column norms, ``‖Â⁻¹‖₂ = ‖L⁻¹D^½‖²₂`` by power iteration."""
    jacobi_diagonal = scale.square() * factor.inverse_diagonal()  # Â⁻¹'s diagonal
    trace = jacobi_diagonal.sum()
    inverse = factor.inverse
    scaled = scale.to(inverse.dtype)
    vector = jacobi_diagonal.to(inverse.dtype)  # the power iteration's start
    estimate = trace / scale.numel()
    for _ in range(POWER_STEPS):
        norm = torch.linalg.vector_norm(vector)
        if not bool(norm > 0):
            break
        vector = vector / norm
        image = scaled * (inverse.mT @ (inverse @ (scaled * vector)))
        estimate = torch.maximum(estimate, torch.dot(vector, image).to(torch.float64))
        vector = image
    spectral = torch.minimum(estimate, trace)
    return _Jacobi(trace, spectral, (spectral * trace).sqrt())


def _solve_errors(
    factor: InverseFactor,
    scale: Tensor,
    c0: Tensor,
    ef_direction: Tensor,
    zeta: float,
    damping: float,
    statistics: DampedStatistics,
) -> list[Tensor]:
    """Rounding estimates of the cosines and projections that use ``c₀ = A⁻¹b`` (float64).

    ``K_V``, ``K_UV = BᵀK_V`` and ``K_VB`` come from one Gram matrix, so an error ``E`` moves
    ``A`` and ``K_V`` together: ``gᵀA⁻¹g`` by ``λc₀ᵀEc₀``, ``‖A⁻¹g‖² = c₀ᵀK_Vc₀`` by
    ``c₀ᵀ(2λA⁻¹ − I)Ec₀`` and ``⟨A⁻¹g, B⁻¹g⟩ = c₀ᵀK_VBe`` by ``λc₀ᵀEA⁻¹Be``; with
    ``xᵀEy ≈ ζ‖D^½x‖‖D^½y‖`` and the cosines' errors from those of their terms (the
    squared norm counting half).
    """
    solved = factor.solve(torch.stack([c0, ef_direction], dim=1))
    w0 = (scale * c0).norm()
    u0, ue = (scale * solved[:, 0]).norm(), (scale * solved[:, 1]).norm()
    nat_sq = statistics.nat_sq.clamp_min(0.0)
    sq_error = relative(zeta * w0 * (w0 + 2.0 * damping * u0), nat_sq)
    projection_error = relative(zeta * damping * w0.square(), statistics.nat_projection)
    cross_error = relative(zeta * damping * w0 * ue, (nat_sq * statistics.ef_sq).sqrt())
    return [projection_error + 0.5 * sq_error, cross_error + 0.5 * sq_error]


__all__ = [
    "MIXED_TOLERANCE",
    "REFINEMENT_STEPS",
    "Factored",
    "factored_statistics",
    "frobenius_error",
    "rounding_level",
    "shadow_errors",
]
