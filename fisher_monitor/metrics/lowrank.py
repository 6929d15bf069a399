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
) -> LayerStatistics:
    """Additive statistics of ``F = VVᵀ`` against ``EF = UUᵀ`` from Gram matrices.

    See the module docstring for the identities used.

    Args:
        gram_u: ``K_U = UᵀU`` (``N × N``), with ``U = [g_1 … g_N]/√N``.
        gram_v: ``K_V = VᵀV`` (``R × R``).
        gram_uv: ``K_UV = UᵀV`` (``N × R``).
        dimension: Number of parameters ``D`` of the block.
        dampings: Damping values λ (> 0).

    Returns:
        The block's additive statistics.
    """
    n, r = gram_uv.shape
    a = torch.full((n,), n**-0.5, dtype=gram_u.dtype, device=gram_u.device)
    k_a = gram_u @ a
    grad_sq = a @ k_a
    w = gram_uv.T @ a  # Vᵀg
    trace_ef = torch.diagonal(gram_u).sum()
    frob_ef_sq = gram_u.square().sum()
    frob_f_sq = gram_v.square().sum()
    inner = gram_uv.square().sum()
    damped = []
    for damping in dampings:
        fisher_factor = factor_damped_gram(gram_v, damping)
        ef = empirical_solve(gram_u, damping)
        c = fisher_factor.solve(w)
        w_c = w @ c
        k_uv_c = gram_uv @ c
        nat_projection = (grad_sq - w_c) / damping
        nat_sq = (grad_sq - 2.0 * w_c + c @ (gram_v @ c)) / damping**2
        nat_ef = (a @ (gram_u @ ef.coefficients) - ef.coefficients @ k_uv_c) / damping
        projected = fisher_factor.half_solve(gram_uv.T)
        trace_u = (trace_ef - torch.linalg.vector_norm(projected) ** 2) / damping
        trace_v = r - damping * fisher_factor.trace_inverse
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
    return LayerStatistics(
        dimension=dimension,
        trace_f=torch.diagonal(gram_v).sum(),
        trace_ef=trace_ef,
        frob_f_sq=frob_f_sq,
        frob_ef_sq=frob_ef_sq,
        inner=inner,
        frob_diff_sq=(frob_ef_sq + frob_f_sq - 2.0 * inner).clamp_min(0.0),
        damped=damped,
    )
