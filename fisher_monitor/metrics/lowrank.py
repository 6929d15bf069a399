"""Statistics of exact per-layer blocks from Gram matrices, never forming ``D × D``.

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

The cost is one Cholesky factorisation of an ``R × R`` and of an ``N × N`` matrix per
damping value. Inputs should be float64: the ``1/λ`` terms amplify rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fisher_monitor.metrics.dense import dense_statistics
from fisher_monitor.metrics.statistics import DampedStatistics, LayerStatistics


@dataclass
class DampedGram:
    """Factorisation of ``λI + K`` for one damping value.

    Attributes:
        damping: λ.
        cholesky: Lower Cholesky factor ``L`` of ``λI + K``.
        logdet_ratio: ``log det(I + K/λ)``.
        trace_inverse: ``tr((λI + K)⁻¹)``.
    """

    damping: float
    cholesky: Tensor
    logdet_ratio: Tensor
    trace_inverse: Tensor

    def solve(self, rhs: Tensor) -> Tensor:
        """Return ``(λI + K)⁻¹ rhs`` for a vector or matrix ``rhs``."""
        vector = rhs.dim() == 1
        out = torch.cholesky_solve(rhs.unsqueeze(-1) if vector else rhs, self.cholesky)
        return out.squeeze(-1) if vector else out

    def half_solve(self, rhs: Tensor) -> Tensor:
        """Return ``L⁻¹ rhs`` so that ``‖L⁻¹ rhs‖²_F = tr(rhsᵀ (λI + K)⁻¹ rhs)``."""
        return torch.linalg.solve_triangular(self.cholesky, rhs, upper=False)


def factor_damped_gram(gram: Tensor, damping: float) -> DampedGram:
    """Factorise ``λI + K`` for a positive semi-definite Gram matrix ``K``.

    Falls back to an eigendecomposition with eigenvalues clipped at zero when rounding
    makes ``λI + K`` numerically indefinite (tiny λ relative to ``K``).

    Args:
        gram: Symmetric positive semi-definite ``k × k`` matrix.
        damping: λ > 0.

    Returns:
        The factorisation.
    """
    k = gram.shape[0]
    # Cholesky reads the lower triangle only, so the Gram needs no symmetrisation
    shifted = gram.clone()
    shifted.diagonal().add_(damping)
    cholesky, info = torch.linalg.cholesky_ex(shifted)
    if int(info) != 0:
        sigma, q = torch.linalg.eigh(0.5 * (gram + gram.T))
        sigma = sigma.clamp_min(0.0)
        # a triangular factor of the clipped λI + QΣQᵀ = (Q√(Σ+λ))(Q√(Σ+λ))ᵀ, from a QR
        root = q * (sigma + damping).sqrt()
        cholesky = torch.linalg.qr(root.T, mode="r")[1].T
        cholesky = cholesky * torch.sign(torch.diagonal(cholesky)).unsqueeze(0)
    diag = torch.diagonal(cholesky)
    logdet_ratio = 2.0 * torch.log(diag).sum() - k * torch.log(
        torch.as_tensor(damping, dtype=gram.dtype, device=gram.device)
    )
    return DampedGram(damping, cholesky, logdet_ratio, inverse_square_norm(cholesky))


def inverse_square_norm(lower: Tensor, base: int = 128) -> Tensor:
    """``‖L⁻¹‖²_F`` for a lower-triangular ``L`` (``= tr((LLᵀ)⁻¹)``), in about ``k³/3`` flops.

    With ``L = [[A, 0], [B, C]]``, ``L⁻¹ = [[A⁻¹, 0], [−C⁻¹BA⁻¹, C⁻¹]]``, so the squared norm
    is ``‖A⁻¹‖² + ‖C⁻¹‖² + ‖C⁻¹BA⁻¹‖²``; the off-diagonal block takes two triangular solves
    and the diagonal blocks recurse. A triangular solve against the identity would cost
    three times as much.

    Args:
        lower: ``k × k`` lower-triangular matrix with a non-zero diagonal.
        base: Size below which the inverse is formed directly.

    Returns:
        The squared Frobenius norm of the inverse (0-d tensor).
    """
    k = lower.shape[0]
    if k <= base:
        eye = torch.eye(k, dtype=lower.dtype, device=lower.device)
        return torch.linalg.vector_norm(torch.linalg.solve_triangular(lower, eye, upper=False)) ** 2
    half = k // 2
    top, below, bottom = lower[:half, :half], lower[half:, :half], lower[half:, half:]
    right = torch.linalg.solve_triangular(top, below, upper=False, left=False)  # B A⁻¹
    off_diagonal = torch.linalg.solve_triangular(bottom, right, upper=False)  # C⁻¹ B A⁻¹
    return (
        inverse_square_norm(top, base)
        + inverse_square_norm(bottom, base)
        + torch.linalg.vector_norm(off_diagonal) ** 2
    )


@dataclass
class EmpiricalSolve:
    """Everything about ``B = UUᵀ + λI`` that the structures share for one damping.

    Attributes:
        coefficients: ``b = (λI + K_U)⁻¹ a`` so that ``B⁻¹g = U b``.
        ef_projection: ``gᵀB⁻¹g = aᵀ K_U b``.
        ef_sq: ``‖B⁻¹g‖² = bᵀ K_U b``.
        per_sample: ``tr(K_U (λI + K_U)⁻¹)``.
        logdet_ratio: ``log det(I + K_U/λ) = log det B − D log λ``.
    """

    coefficients: Tensor
    ef_projection: Tensor
    ef_sq: Tensor
    per_sample: Tensor
    logdet_ratio: Tensor


def empirical_solve(gram_u: Tensor, damping: float) -> EmpiricalSolve:
    """Solve with the damped empirical Fisher through its ``N × N`` Gram matrix.

    Args:
        gram_u: ``K_U = UᵀU``, ``N × N``.
        damping: λ > 0.

    Returns:
        The shared EF-side quantities.
    """
    n = gram_u.shape[0]
    a = torch.full((n,), n**-0.5, dtype=gram_u.dtype, device=gram_u.device)
    factor = factor_damped_gram(gram_u, damping)
    b = factor.solve(a)
    k_b = gram_u @ b
    return EmpiricalSolve(
        coefficients=b,
        ef_projection=a @ k_b,
        ef_sq=b @ k_b,
        per_sample=n - damping * factor.trace_inverse,
        logdet_ratio=factor.logdet_ratio,
    )


def lowrank_statistics(
    gram_u: Tensor,
    gram_v: Tensor,
    gram_uv: Tensor,
    dimension: int,
    dampings: Sequence[float],
    coefficients: Tensor | None = None,
) -> LayerStatistics:
    """Additive statistics of ``F = VVᵀ`` against ``EF = UUᵀ`` from Gram matrices.

    See the module docstring for the identities used. Two routes avoid the cancellation
    that ``A⁻¹g = (1/λ)(g − V(λI + K_V)⁻¹Vᵀg)`` suffers when ``g`` lies (almost) in the range
    of ``V`` and λ is small against ``K_V`` — the usual case for the exact Fisher:

    - with ``coefficients`` ``B`` (``R × N``, ``U = VB``: each per-sample gradient written
      in the Fisher's own square-root columns, known exactly for the exact Fisher), the
      push-through identity ``A⁻¹V = V(λI + K_V)⁻¹`` gives ``A⁻¹g = V(λI + K_V)⁻¹Ba`` and
      ``tr(UᵀA⁻¹U) = tr(Bᵀ(λI + K_V)⁻¹K_V B)``, with no division by λ;
    - otherwise the Woodbury formulas are used, and where they would lose more than half
      the digits the statistics are recomputed densely in an orthonormal basis of the
      joint range of ``U`` and ``V`` (:func:`joint_basis_statistics`).

    Args:
        gram_u: ``K_U = UᵀU`` (``N × N``), with ``U = [g_1 … g_N]/√N``.
        gram_v: ``K_V = VᵀV`` (``R × R``).
        gram_uv: ``K_UV = UᵀV`` (``N × R``).
        dimension: Number of parameters ``D`` of the block.
        dampings: Damping values λ (> 0).
        coefficients: Optional ``B`` with ``U = VB``. When given, ``gram_u`` and
            ``gram_uv`` must equal ``BᵀK_VB`` and ``BᵀK_V``.

    Returns:
        The block's additive statistics.
    """
    n, r = gram_uv.shape
    a = torch.full((n,), n**-0.5, dtype=gram_u.dtype, device=gram_u.device)
    trace_ef = torch.diagonal(gram_u).sum()
    frob_ef_sq = gram_u.square().sum()
    frob_f_sq = gram_v.square().sum()
    inner = gram_uv.square().sum()
    undamped = dict(
        dimension=dimension,
        trace_f=torch.diagonal(gram_v).sum(),
        trace_ef=trace_ef,
        frob_f_sq=frob_f_sq,
        frob_ef_sq=frob_ef_sq,
        inner=inner,
        frob_diff_sq=(frob_ef_sq + frob_f_sq - 2.0 * inner).clamp_min(0.0),
    )
    if coefficients is not None:
        gradient_coefficients = coefficients @ a  # g = V B a
        w = gram_v @ gradient_coefficients  # Vᵀg
        grad_sq = gradient_coefficients @ w
    else:
        grad_sq = a @ (gram_u @ a)
        w = gram_uv.T @ a  # Vᵀg
    damped = []
    for damping in dampings:
        fisher_factor = factor_damped_gram(gram_v, damping)
        ef = empirical_solve(gram_u, damping)
        trace_v = r - damping * fisher_factor.trace_inverse
        c = fisher_factor.solve(w)  # (λI + K_V)⁻¹Vᵀg
        if coefficients is not None:
            # A⁻¹g = V(λI + K_V)⁻¹b; every product is arranged to act on K_V b first, so
            # components of b in the null space of K_V (which V ignores) are never divided by λ;
            # here c = (λI + K_V)⁻¹K_V b = K_V (λI + K_V)⁻¹ b
            nat_projection = gradient_coefficients @ c
            nat_sq = gradient_coefficients @ fisher_factor.solve(c)
            nat_ef = c @ (coefficients @ ef.coefficients)
            trace_u = (
                fisher_factor.half_solve(coefficients) * fisher_factor.half_solve(gram_uv.T)
            ).sum()  # tr(Bᵀ(λI + K_V)⁻¹K_V B), with VᵀU = K_V B
        else:
            w_c = w @ c
            residual_sq = grad_sq - 2.0 * w_c + c @ (gram_v @ c)  # ‖g − Vc‖² = λ²‖A⁻¹g‖²
            if residual_sq <= 1e-8 * grad_sq or grad_sq - w_c <= 1e-8 * grad_sq:
                return joint_basis_statistics(gram_u, gram_v, gram_uv, dimension, dampings)
            nat_projection = (grad_sq - w_c) / damping
            nat_sq = residual_sq / damping**2
            nat_ef = (a @ (gram_u @ ef.coefficients) - ef.coefficients @ (gram_uv @ c)) / damping
            projected = fisher_factor.half_solve(gram_uv.T)
            trace_u = (trace_ef - torch.linalg.vector_norm(projected) ** 2) / damping
        kl = 0.5 * (trace_u - trace_v + fisher_factor.logdet_ratio - ef.logdet_ratio)
        damped.append(
            DampedStatistics(
                damping_mass=torch.as_tensor(
                    damping * dimension, dtype=gram_u.dtype, device=gram_u.device
                ),
                kl=kl,
                grad_sq=grad_sq,
                nat_sq=nat_sq.clamp_min(0.0),
                ef_sq=ef.ef_sq,
                nat_ef=nat_ef,
                nat_projection=nat_projection,
                ef_projection=ef.ef_projection,
                ef_projection_per_sample=ef.per_sample,
            )
        )
    return LayerStatistics(**undamped, damped=damped)


def joint_basis_statistics(
    gram_u: Tensor,
    gram_v: Tensor,
    gram_uv: Tensor,
    dimension: int,
    dampings: Sequence[float],
) -> LayerStatistics:
    """The statistics computed densely in an orthonormal basis of ``range([V, U])``.

    With ``W = [V, U]`` and ``K_W = WᵀW = QΛQᵀ`` (positive eigenvalues kept), the columns of
    ``WQΛ^{-1/2}`` are orthonormal and span both factors; in that basis ``V`` and ``U``
    have coordinates ``Λ^{-1/2}QᵀK_W`` and ``g`` lies inside, while outside it F, EF and g
    all vanish, so ``A`` and ``B`` act as ``λI`` there and contribute nothing to any
    statistic but the dimension. Costs an eigendecomposition of size ``R + N``: the
    fallback for when Woodbury's formulas would cancel.
    """
    n, r = gram_uv.shape
    joint = torch.cat(
        [torch.cat([gram_v, gram_uv.T], dim=1), torch.cat([gram_uv, gram_u], dim=1)], dim=0
    )
    eigenvalues, vectors = torch.linalg.eigh(0.5 * (joint + joint.T))
    keep = eigenvalues > eigenvalues.max() * joint.shape[0] * torch.finfo(joint.dtype).eps
    to_basis = (vectors[:, keep] / eigenvalues[keep].sqrt()).T  # Λ^{-1/2} Qᵀ
    coordinates = to_basis @ joint  # columns: V's, then U's, in the basis
    v_basis, u_basis = coordinates[:, :r], coordinates[:, r:]
    a = torch.full((n,), n**-0.5, dtype=gram_u.dtype, device=gram_u.device)
    return dense_statistics(
        v_basis @ v_basis.T, u_basis @ u_basis.T, u_basis @ a, dampings, dimension=dimension
    )
