"""The Gram route of the ``block`` structure: statistics from ``R × R`` Gram matrices.

Let ``U = [g_1 … g_N]/√N`` (``D × N``) so that ``EF = UUᵀ``, and ``V`` (``D × R``) a
square-root factor with ``F = VVᵀ``. The mean gradient is ``g = U a`` with
``a = 1/√N · 1``. Every statistic is a function of the small Gram matrices
``K_U = UᵀU``, ``K_V = VᵀV`` and ``K_UV = UᵀV``:

- ``‖EF − F‖²_F = ‖K_U‖² + ‖K_V‖² − 2‖K_UV‖²`` and ``⟨EF, F⟩_F = ‖K_UV‖²``;
- Woodbury: ``A⁻¹ = (1/λ)(I − V (λI + K_V)⁻¹ Vᵀ)``, so ``A⁻¹g = (1/λ)(g − V c)`` with
  ``c = (λI + K_V)⁻¹ Vᵀg``, and ``B⁻¹g = U (λI + K_U)⁻¹ a``;
- ``log det A − log det B = log det(I + K_V/λ) − log det(I + K_U/λ)`` (``D`` cancels);
- ``tr(B A⁻¹) − D = tr(UᵀA⁻¹U) − tr(VᵀA⁻¹V)`` with
  ``tr(VᵀA⁻¹V) = R − λ tr((λI + K_V)⁻¹)``;
- ``(1/N) Σ_n g_nᵀ B⁻¹ g_n = tr(K_U (λI + K_U)⁻¹) = N − λ tr((λI + K_U)⁻¹)``.

Cholesky factorisations of ``λI + K`` per damping, or one eigendecomposition of ``K``
shared by every damping of a list: the cheapest route for wide layers. A float64 Gram
matrix resolves the spectrum of ``K`` only down to its rounding level
``τ ≈ ε √D max_i K_ii``: curvature directions below it (near-duplicate samples, a weight
whose inputs are many orders of magnitude smaller than its bias' constant input) are
blurred, and where they matter at the given damping the statistics are off; the route
estimates by how much (its :class:`~fisher_monitor.structures.base.NumericalHealth`).

With coefficients ``B`` (``R × N``, ``U = VB``: each per-sample gradient written in the
Fisher's own square-root columns, known in closed form for the exact Fisher), ``g`` lies
in the range of ``V`` by construction and the push-through identity
``A⁻¹V = V(λI + K_V)⁻¹`` gives ``A⁻¹g = V(λI + K_V)⁻¹Ba`` with no division by λ. Without
them (Monte-Carlo labels), the Woodbury formulas are used, and where ``g − Vc`` would
cancel, the statistics are computed in an orthonormal basis of the joint range of ``V``
and ``U`` (:func:`~.root_route.joint_basis_block_statistics`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fisher_monitor.factors import LayerFactors
from fisher_monitor.linalg import (
    eigh_psd,
    factor_damped_gram,
    gram_resolution,
    relative,
    square_norm,
)
from fisher_monitor.metrics import LayerStatistics
from fisher_monitor.structures.base import NumericalHealth
from fisher_monitor.structures.block.factored import (
    SHADOW_MARGIN,
    factored_statistics,
    rounding_level,
    shadow_errors,
)
from fisher_monitor.structures.block.root_route import joint_basis_block_statistics
from fisher_monitor.structures.block.sums import (
    BlockStatistics,
    as_dense,
    assemble_damped,
    assemble_undamped,
    worst_error,
)
from fisher_monitor.structures.empirical import (
    EmpiricalSolve,
    check_empirical,
    empirical_solves,
    mean_weights,
)

#: With at least this many dampings, one eigendecomposition of ``K_V`` replaces the
#: per-damping Cholesky factorisations (an ``R × R`` ``eigh`` costs about as much as five
#: Cholesky passes with their solves; measured with ``benchmarks/metrics_micro.py``).
SPECTRAL_MIN_DAMPINGS = 5


# ---------------------------------------------------------------------- Gram route
def gram_block_statistics(
    gram_u: Tensor,
    gram_v: Tensor,
    gram_uv: Tensor,
    dimension: int,
    dampings: Sequence[float],
    coefficients: Tensor | None = None,
    *,
    empirical: Sequence[EmpiricalSolve] | None = None,
    length: int | None = None,
) -> BlockStatistics:
    """Block statistics from Gram matrices, with their rounding estimate.

    See :func:`lowrank_statistics` for the arguments; ``empirical`` takes precomputed
    EF-side solves (:func:`empirical_solves`, one per damping) instead of solving again,
    and ``length`` is the length of the dot products the Grams were formed from (default
    ``dimension``; rounding grows with it). With coefficients and fewer than
    :data:`SPECTRAL_MIN_DAMPINGS` dampings the statistics come from the inverse Cholesky
    factor (:func:`~.factored.factored_statistics`).

    Returns:
        Statistics, health and the EF-side solves.
    """
    check_empirical(empirical, dampings)
    r = gram_uv.shape[1]
    if empirical is None:
        empirical = empirical_solves(gram_u, dampings, dimension)
    undamped = assemble_undamped(
        dimension,
        torch.diagonal(gram_v).sum(),
        torch.diagonal(gram_u).sum(),
        square_norm(gram_v),  # no R × R temporary of squares (fresh pages at every call)
        square_norm(gram_u),
        square_norm(gram_uv),
    )
    resolution = gram_resolution(gram_v, dimension)
    grad_sq_error = _grad_sq_error(gram_u, gram_v, coefficients, dimension, resolution)
    natural = None
    if coefficients is None:
        result = _woodbury(gram_u, gram_v, gram_uv, dimension, dampings, empirical, resolution)
        if result is None:
            joint = joint_basis_block_statistics(
                gram_u, gram_v, gram_uv, dimension, dampings, empirical=empirical
            )
            for statistics in joint.statistics.damped:
                statistics.grad_sq_error = grad_sq_error
            return joint
        damped, errors = result
    elif len(dampings) >= SPECTRAL_MIN_DAMPINGS:
        damped, errors = _coefficients_spectral(
            gram_v, gram_uv, coefficients, dimension, dampings, empirical, resolution
        )
    else:
        shadow = r <= SHADOW_MAX_COLUMNS  # estimated by a rerun: no model estimate needed
        arguments = (gram_v, gram_uv, coefficients, dimension, dampings, empirical, resolution)
        damped, errors, natural = _coefficients_cholesky(*arguments, length, estimate=not shadow)
        if shadow and natural is not None:
            probed = _probed(damped, gram_v, coefficients, dimension, dampings, empirical, length)
            if probed is None:  # neither rerun could be done: the model's estimates
                errors = _coefficients_cholesky(*arguments, length)[1]
            else:
                errors = probed
    errors += [ef.relative_error for ef in empirical if ef.relative_error is not None]
    for statistics in damped:
        statistics.grad_sq_error = grad_sq_error
    return BlockStatistics(
        statistics=LayerStatistics(**undamped, damped=damped),
        health=NumericalHealth("gram", worst_error(errors, gram_v)),
        empirical=list(empirical),
        natural=natural,
    )


def _grad_sq_error(gram_u, gram_v, coefficients, dimension, resolution) -> Tensor:
    """The rounding error of ``‖g‖²`` from the Gram it is read from."""
    a = mean_weights(gram_u.shape[0], gram_v)
    if coefficients is None:  # ‖g‖² = aᵀK_Ua
        return gram_resolution(gram_u, dimension) * (a @ a)
    b = coefficients @ a  # ‖g‖² = bᵀK_Vb with b = Ba
    return resolution * (b @ b)


#: Up to this many Fisher columns the rounding estimate comes from a rerun of the same
#: computation (:func:`_probed`: one more factorisation, cheap at these sizes); beyond,
#: from the model of :mod:`~.factored`.
SHADOW_MAX_COLUMNS = 512
#: Size of the perturbed rerun's perturbation, in units of float64's own rounding ``ζ``:
#: large against rounding (the difference is the perturbation's effect), small enough to
#: stay in the linear regime wherever the statistics are worth reporting.
PROBE_AMPLITUDE = 30.0
#: The float32 rerun's estimate holds while its statistics moved by at most this much
#: (relative): beyond, they may have saturated (float32 lost what float64 kept, or both lost
#: the same, and the difference no longer grows with the perturbation), and the perturbed
#: float64 rerun is run as well, the larger estimate kept.
LINEAR_MOVE = 1e-2


def _probed(damped, gram_v, coefficients, dimension, dampings, empirical, length):
    """Rounding estimates from a rerun of the statistics (:func:`~.factored.shadow_errors`).

    The rerun measures the sensitivities of this very problem, where a model of them can
    be off by orders of magnitude either way. First in float32: rounding ``K_V`` to float32
    (``ε₃₂/2`` of each entry) and factorising it there perturbs it like float64's rounding
    (``ε₆₄ √L`` from the dot products of length ``L``, ``ε₆₄ √R`` from the factorisation),
    ``ε₃₂ √(1 + R) / (ε₆₄ √(L + R))`` times larger. Where float32 cannot factorise
    ``λI + K_V`` (a damping below its resolution), in float64 with every entry moved by
    ``±η ζ |K_ij|`` (``η =`` :data:`PROBE_AMPLITUDE`, ``ζ = ε₆₄ √(L + R)``, signs from a
    fixed seed); in float64 too where the float32 rerun moved the statistics by more than
    :data:`LINEAR_MOVE` (out of the linear regime its scaling assumes: on a head whose
    inputs are 2e-10 small, float32 and float64 both lose the inputs' part of ``K_V`` and
    agree, while the statistics are 6e-5 off). ``K_UV`` and ``K_U`` follow ``K_V`` through
    ``B``.

    Returns:
        The estimates, or ``None`` where neither rerun could be done.
    """
    r = gram_v.shape[0]
    length = dimension if length is None else length
    eps64, eps32 = torch.finfo(torch.float64).eps, torch.finfo(torch.float32).eps
    single = gram_v.float().double()
    scale = eps64 * math.sqrt(length + r) / (eps32 * math.sqrt(1 + r))
    found = _rerun(damped, single, coefficients, dimension, dampings, empirical, scale, True)
    linear = LINEAR_MOVE * scale * SHADOW_MARGIN
    if found is not None and max(float(error) for error in found) <= linear:
        return found
    zeta = rounding_level(torch.float64, length, r)
    generator = torch.Generator(device=gram_v.device).manual_seed(0)
    signs = torch.randint(0, 2, (r, r), generator=generator, device=gram_v.device)
    noise = (2.0 * signs - 1.0).to(gram_v.dtype).triu()
    noise = noise + noise.triu(1).mT
    perturbed = gram_v + (PROBE_AMPLITUDE * zeta) * (gram_v * noise)
    # the perturbed rerun errs high by itself (one ±1 draw against rounding's smaller
    # typical entries): two thirds of the margin
    scale = 2.0 / (3.0 * PROBE_AMPLITUDE)
    rerun = _rerun(damped, perturbed, coefficients, dimension, dampings, empirical, scale)
    if found is None or rerun is None:
        return rerun if found is None else found
    return [torch.maximum(a, b) for a, b in zip(found, rerun, strict=True)]


def _rerun(damped, gram_v, coefficients, dimension, dampings, empirical, scale, single=False):
    """The statistics on ``gram_v`` (float32 arithmetic if ``single``), as rounding estimates."""
    gram_uv = (gram_v @ coefficients).mT  # BᵀK'
    gram_u = gram_uv @ coefficients
    try:
        probe_empirical = empirical_solves(gram_u.float() if single else gram_u, dampings)
    except RuntimeError:
        return None
    probe = factored_statistics(
        gram_v.float() if single else gram_v,
        gram_uv,
        coefficients,
        dimension,
        dampings,
        [_as_float64(solve) for solve in probe_empirical],
        diagonal=torch.diagonal(gram_v).to(torch.float64),
        length=dimension,
        probe=True,
    )
    if probe is None:
        return None
    return shadow_errors(damped, empirical, probe.damped, probe_empirical, scale)


def _as_float64(solve: EmpiricalSolve) -> EmpiricalSolve:
    fields = ("coefficients", "ef_projection", "ef_sq", "per_sample", "logdet_ratio")
    values = [getattr(solve, name).to(torch.float64) for name in fields]
    return EmpiricalSolve(*values, relative_error=solve.relative_error)


def _coefficients_cholesky(
    gram_v, gram_uv, coefficients, dimension, dampings, empirical, tau, length=None, estimate=True
):
    """Coefficient path, one Cholesky factorisation of ``λI + K_V`` per damping.

    From the inverse Cholesky factor (:func:`~.factored.factored_statistics`); where
    ``λI + K_V`` is numerically indefinite, from a factor built by eigendecomposition
    (:func:`_coefficients_indefinite`). Returns the damped statistics, the error estimates
    (none from the factor without ``estimate``) and ``c₀ = (λI + K_V)⁻¹Ba`` per damping
    (``A⁻¹g = Vc₀``).
    """
    factored = factored_statistics(
        gram_v,
        gram_uv,
        coefficients,
        dimension,
        dampings,
        empirical,
        diagonal=torch.diagonal(gram_v).to(torch.float64),
        length=dimension if length is None else length,
        estimate=estimate,
    )
    if factored is None:
        return _coefficients_indefinite(
            gram_v, gram_uv, coefficients, dimension, dampings, empirical, tau
        )
    return factored.damped, factored.errors, factored.natural


def _coefficients_indefinite(gram_v, gram_uv, coefficients, dimension, dampings, empirical, tau):
    """Coefficient path, one Cholesky factorisation of ``λI + K_V`` per damping.

    With ``b = Ba`` (``g = Vb``), ``y₀ = L⁻¹b``, ``y₁ = L⁻¹K_Vb``, ``c₀ = L⁻ᵀy₀ = (λI + K_V)⁻¹b``
    and ``c = L⁻ᵀy₁ = (λI + K_V)⁻¹K_Vb``: ``gᵀA⁻¹g = y₀·y₁``, ``‖A⁻¹g‖² = c₀·c``,
    ``⟨A⁻¹g, B⁻¹g⟩ = c·(B e)`` and ``tr(UᵀA⁻¹U) = Σ (L⁻¹B) ⊙ (L⁻¹K_VB)``. Every product
    acts on ``K_V b`` or ``K_V B``, so components of ``b`` in the null space of ``K_V`` (which
    ``V`` ignores) are never divided by λ. All right-hand sides go through one triangular
    solve per damping. Returns the damped statistics, the error estimates and ``c₀`` per
    damping (``A⁻¹g = Vc₀``).
    """
    n, r = gram_uv.shape
    a = mean_weights(n, gram_v)
    b = coefficients @ a
    k_b = gram_uv.mT @ a  # K_V B a = K_V b
    grad_sq = b @ k_b
    rhs = torch.cat([b.unsqueeze(1), k_b.unsqueeze(1), as_dense(coefficients), gram_uv.mT], dim=1)
    workspace = torch.empty_like(gram_v)
    damped, errors, natural = [], [], []
    for damping, ef in zip(dampings, empirical, strict=True):
        factor = factor_damped_gram(gram_v, damping, workspace)
        y = factor.half_solve(rhs)
        y0, y1 = y[:, 0], y[:, 1]
        c0_c = factor.back_solve(y[:, :2])
        c0, c = c0_c[:, 0], c0_c[:, 1]
        natural.append(c0)
        nat_projection = y0 @ y1
        nat_sq = c0 @ c
        nat_ef = c @ (coefficients @ ef.coefficients)
        trace_u = (y[:, 2 : 2 + n] * y[:, 2 + n :]).sum()
        trace_v = r - damping * factor.trace_inverse
        kl = 0.5 * (trace_u - trace_v + factor.logdet_ratio - ef.logdet_ratio)
        damped.append(
            assemble_damped(damping, dimension, kl, grad_sq, nat_sq, nat_ef, nat_projection, ef)
        )
        # an error τ on K_V moves ‖V c₀‖² by about τ‖c₀‖² and bᵀK_V c₀ by about λτ‖c₀‖²
        c0_sq = c0.square().sum()
        errors += [relative(tau * c0_sq, nat_sq), relative(tau * damping * c0_sq, nat_projection)]
    return damped, errors, natural


def _coefficients_spectral(gram_v, gram_uv, coefficients, dimension, dampings, empirical, tau):
    """Coefficient path from one eigendecomposition ``K_V = W diag(σ) Wᵀ`` for all dampings.

    With ``b̂ = Wᵀb``, ``B̂ = WᵀB`` and ``f = σ/(σ+λ)``: ``gᵀA⁻¹g = Σ f b̂²``,
    ``‖A⁻¹g‖² = Σ f b̂²/(σ+λ)``, ``⟨A⁻¹g, B⁻¹g⟩ = Σ f b̂ (B̂e)``,
    ``tr(UᵀA⁻¹U) = Σ_i f_i ‖B̂_i‖²``, ``tr(VᵀA⁻¹V) = Σ f``, ``log det(I + K_V/λ) = Σ log(1 + σ/λ)``.
    """
    n = gram_uv.shape[0]
    a = mean_weights(n, gram_v)
    sigma, vectors = eigh_psd(gram_v)
    rotated = vectors.mT @ torch.cat([(coefficients @ a).unsqueeze(1), as_dense(coefficients)], 1)
    b_hat, coefficients_hat = rotated[:, 0], rotated[:, 1:]
    row_sq = coefficients_hat.square().sum(dim=1)
    grad_sq = (sigma * b_hat.square()).sum()
    damped, errors = [], []
    for damping, ef in zip(dampings, empirical, strict=True):
        shifted = sigma + damping
        f = sigma / shifted
        nat_projection = (f * b_hat.square()).sum()
        nat_sq = (f * b_hat.square() / shifted).sum()
        nat_ef = (f * b_hat * (coefficients_hat @ ef.coefficients)).sum()
        trace_u = (f * row_sq).sum()
        kl = 0.5 * (trace_u - f.sum() + torch.log1p(sigma / damping).sum() - ef.logdet_ratio)
        damped.append(
            assemble_damped(damping, dimension, kl, grad_sq, nat_sq, nat_ef, nat_projection, ef)
        )
        c_sq = (b_hat / shifted).square().sum()
        errors += [relative(tau * c_sq, nat_sq), relative(tau * damping * c_sq, nat_projection)]
    return damped, errors


#: The Woodbury formulas lose all digits of ``‖g − Vc‖²`` below this fraction of ``‖g‖²``
#: (a cancellation); from there on the joint basis takes over.
WOODBURY_CANCELLATION = 1e-8


def _woodbury(gram_u, gram_v, gram_uv, dimension, dampings, empirical, tau):
    """Woodbury path (no coefficients): ``A⁻¹g = (g − Vc)/λ``, ``c = (λI + K_V)⁻¹Vᵀg``.

    Returns ``None`` when ``g − Vc`` or ``gᵀg − wᵀc`` cancels (``g`` almost inside the
    range of ``V`` at a damping small against ``K_V``).
    """
    n, r = gram_uv.shape
    a = mean_weights(n, gram_u)
    grad_sq = a @ (gram_u @ a)
    w = gram_uv.mT @ a  # Vᵀg
    trace_ef = torch.diagonal(gram_u).sum()
    workspace = torch.empty_like(gram_v)
    damped, errors = [], []
    for damping, ef in zip(dampings, empirical, strict=True):
        factor = factor_damped_gram(gram_v, damping, workspace)
        c = factor.solve(w)  # (λI + K_V)⁻¹Vᵀg
        w_c = w @ c
        residual_sq = grad_sq - 2.0 * w_c + c @ (gram_v @ c)  # ‖g − Vc‖² = λ²‖A⁻¹g‖²
        cancellation = WOODBURY_CANCELLATION * grad_sq
        if bool(residual_sq <= cancellation) or bool(grad_sq - w_c <= cancellation):
            return None
        nat_projection = (grad_sq - w_c) / damping
        nat_sq = residual_sq / damping**2
        nat_ef = (a @ (gram_u @ ef.coefficients) - ef.coefficients @ (gram_uv @ c)) / damping
        projected = factor.half_solve(gram_uv.mT)
        trace_u = (trace_ef - torch.linalg.vector_norm(projected) ** 2) / damping
        trace_v = r - damping * factor.trace_inverse
        kl = 0.5 * (trace_u - trace_v + factor.logdet_ratio - ef.logdet_ratio)
        damped.append(
            assemble_damped(damping, dimension, kl, grad_sq, nat_sq, nat_ef, nat_projection, ef)
        )
        # ‖g − Vc‖² is a quadratic form in [g, V] with coefficients [1, −c]: an error τ on
        # the joint Gram moves it by about τ(1 + ‖c‖²); gᵀg − wᵀc by about τ(1 + ‖c‖)²
        c_sq = c.square().sum()
        scale = torch.maximum(tau, gram_resolution(gram_u, dimension))
        errors += [
            relative(scale * (1.0 + c_sq), residual_sq),
            relative(scale * (1.0 + c_sq.sqrt()) ** 2, grad_sq - w_c),
        ]
    return damped, errors


def lowrank_statistics(
    gram_u: Tensor,
    gram_v: Tensor,
    gram_uv: Tensor,
    dimension: int,
    dampings: Sequence[float],
    coefficients: Tensor | None = None,
    *,
    empirical: Sequence[EmpiricalSolve] | None = None,
) -> LayerStatistics:
    """Additive statistics of ``F = VVᵀ`` against ``EF = UUᵀ`` from Gram matrices.

    See the module docstring for the identities used. Two routes avoid the cancellation
    that ``A⁻¹g = (1/λ)(g − V(λI + K_V)⁻¹Vᵀg)`` suffers when ``g`` lies (almost) in the range
    of ``V`` and λ is small against ``K_V`` — the usual case for the exact Fisher:

    - with ``coefficients`` ``B`` (``R × N``, ``U = VB``), the push-through identity
      ``A⁻¹V = V(λI + K_V)⁻¹`` gives ``A⁻¹g = V(λI + K_V)⁻¹Ba`` and
      ``tr(UᵀA⁻¹U) = tr(Bᵀ(λI + K_V)⁻¹K_V B)``, with no division by λ; with
      :data:`SPECTRAL_MIN_DAMPINGS` or more dampings one eigendecomposition of ``K_V``
      serves them all;
    - otherwise the Woodbury formulas are used, and where they would cancel the
      statistics are computed in an orthonormal basis of the joint range of ``U`` and
      ``V`` (:func:`joint_basis_statistics`).

    :func:`gram_block_statistics` returns the same statistics with a rounding estimate.

    Args:
        gram_u: ``K_U = UᵀU`` (``N × N``), with ``U = [g_1 … g_N]/√N``.
        gram_v: ``K_V = VᵀV`` (``R × R``).
        gram_uv: ``K_UV = UᵀV`` (``N × R``).
        dimension: Number of parameters ``D`` of the block.
        dampings: Damping values λ (> 0).
        coefficients: Optional ``B`` with ``U = VB``. When given, ``gram_u`` and
            ``gram_uv`` must equal ``BᵀK_VB`` and ``BᵀK_V``.
        empirical: Optional precomputed EF-side solves (:func:`empirical_solves`), one
            per damping.

    Returns:
        The block's additive statistics.
    """
    return gram_block_statistics(
        gram_u, gram_v, gram_uv, dimension, dampings, coefficients, empirical=empirical
    ).statistics


def coefficient_grams(factors: LayerFactors, gram_v: Tensor, coefficients: Tensor):
    """``(K_U, K_UV) = (BᵀK_VB, BᵀK_V)`` as gathers over the block-sparse ``B``.

    Column ``n`` of ``B`` holds sample ``n``'s ``β`` at rows ``r·N + n``.
    """
    n = factors.num_samples
    beta = coefficients.by_column  # (R_n, N)
    columns = beta.shape[0]
    gram_uv = torch.einsum("rn,rnk->nk", beta, gram_v.view(columns, n, -1))
    gram_u = torch.einsum("nrm,rm->nm", gram_uv.view(n, columns, n), beta)
    return gram_u, gram_uv


__all__ = [
    "SPECTRAL_MIN_DAMPINGS",
    "WOODBURY_CANCELLATION",
    "coefficient_grams",
    "gram_block_statistics",
    "lowrank_statistics",
]
