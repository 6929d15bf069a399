"""The linear algebra every structure shares: damped solves, eigendecompositions, rounding.

With ``K`` a positive semi-definite Gram matrix (``UᵀU``, ``VᵀV``) or a dense block and a
damping ``λ > 0``, the structures need ``(λI + K)⁻¹`` applied to vectors, its trace and
``log det(I + K/λ)``. :func:`factor_damped_gram` factorises ``λI + K`` once (Cholesky, with
an eigendecomposition fallback where rounding makes it numerically indefinite), and
:func:`damped_solver` is the one damped solver for a list of dampings (one Cholesky
factorisation for a single value, one eigendecomposition shared by several).

Rounding: a float Gram matrix formed from vectors of ``L`` entries resolves its spectrum
only down to ``τ ≈ ε √L max_i K_ii`` (:func:`gram_resolution`); the routes of the
``block`` structure propagate it into their numerical-health estimates.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: Symmetric matrices up to this size are diagonalised on one CPU thread: at these sizes MKL's
#: multi-threaded ``eigh`` is slower than the single-threaded one (measured with
#: ``benchmarks/metrics_micro.py``).
SINGLE_THREAD_EIGH_MAX = 256


@contextlib.contextmanager
def single_threaded(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Run CPU work on one intra-op thread, restoring the setting afterwards.

    Args:
        device: Where the work runs; nothing changes off the CPU.
        enabled: Whether to switch at all.
    """
    threads = torch.get_num_threads()
    if not enabled or device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def symmetric_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` (lower triangle), single-threaded on CPU where that is faster."""
    with single_threaded(matrix.device, matrix.shape[-1] <= SINGLE_THREAD_EIGH_MAX):
        return torch.linalg.eigh(matrix)


def eigh_psd(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a PSD Gram matrix, eigenvalues clipped at zero.

    The matrix is PSD by construction, so negative eigenvalues are rounding; clipping
    them at exactly zero (not at a threshold) keeps every ``log(1 + σ/λ)`` finite and
    every ``σ/(σ + λ)`` in ``[0, 1]``. ``eigh`` reads only the lower triangle.
    """
    eigenvalues, vectors = symmetric_eigh(gram)
    return eigenvalues.clamp_min(0.0), vectors


def relative(error: Tensor, value: Tensor) -> Tensor:
    """``error / |value|``, 0 where both vanish."""
    tiny = torch.finfo(value.dtype).tiny
    return error / value.abs().clamp_min(tiny)


def gram_resolution(gram: Tensor, length: int) -> Tensor:
    """Rounding level of a float Gram matrix formed from vectors of ``length`` entries.

    Each entry is a dot product with error about ``ε √length ‖v_i‖ ‖v_j‖`` (random
    rounding), so every eigenvalue is known to about ``ε √length max_i K_ii``.
    """
    eps = torch.finfo(gram.dtype).eps
    return eps * math.sqrt(max(length, 1)) * torch.diagonal(gram).abs().max()


# ------------------------------------------------------------------ Cholesky primitives
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

    def back_solve(self, rhs: Tensor) -> Tensor:
        """Return ``L⁻ᵀ rhs`` (so that ``L⁻ᵀ L⁻¹ rhs = (λI + K)⁻¹ rhs``)."""
        return torch.linalg.solve_triangular(self.cholesky.mT, rhs, upper=True)


def factor_damped_gram(gram: Tensor, damping: float, workspace: Tensor | None = None) -> DampedGram:
    """Factorise ``λI + K`` for a positive semi-definite Gram matrix ``K``.

    Cholesky reads only the lower triangle, so the Gram needs no symmetrisation. Where
    rounding makes ``λI + K`` numerically indefinite (λ below the Gram's rounding level),
    the factor is built from an eigendecomposition with the eigenvalues clipped at zero
    (they are non-negative by construction; negative ones are rounding).

    Args:
        gram: Symmetric positive semi-definite ``k × k`` matrix.
        damping: λ > 0.
        workspace: Optional ``k × k`` buffer to hold ``λI + K`` (reused across dampings
            instead of a fresh copy each time).

    Returns:
        The factorisation.
    """
    k = gram.shape[0]
    shifted = gram.clone() if workspace is None else workspace.copy_(gram)
    shifted.diagonal().add_(damping)
    # the upper factor: torch zeroes the other triangle of its column-major result, which
    # is a contiguous pass for the upper one; Uᵀ is then the lower factor, as a view
    upper, info = torch.linalg.cholesky_ex(shifted, upper=True)
    cholesky = upper.mT
    if int(info) != 0:
        sigma, q = symmetric_eigh(gram)
        root = q * (sigma.clamp_min(0.0) + damping).sqrt()
        # a triangular factor of λI + QΣ₊Qᵀ = (Q√(Σ₊+λ))(Q√(Σ₊+λ))ᵀ, from a QR
        cholesky = torch.linalg.qr(root.mT, mode="r")[1].mT
        cholesky = cholesky * torch.sign(torch.diagonal(cholesky)).unsqueeze(0)
    diag = torch.diagonal(cholesky)
    logdet_ratio = 2.0 * torch.log(diag).sum() - k * math.log(damping)
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


def damped_solver(gram: Tensor, dampings: Sequence[float]) -> Callable[[int, Tensor], Tensor]:
    """``solve(i, rhs) = (λ_i I + K)⁻¹ rhs`` for a PSD Gram ``K``, factorised once.

    A single damping takes one Cholesky factorisation (:func:`factor_damped_gram`, which
    falls back to an eigendecomposition where rounding makes ``λI + K`` numerically
    indefinite); several share one eigendecomposition, which costs about as much as five
    Cholesky passes with their solves.
    """
    if len(dampings) == 1:
        factor = factor_damped_gram(gram, dampings[0])
        return lambda index, rhs: factor.solve(rhs)
    eigenvalues, vectors = eigh_psd(gram)

    def solve(index: int, rhs: Tensor) -> Tensor:
        return vectors @ ((vectors.T @ rhs) / (eigenvalues + dampings[index]))

    return solve


def eigen_solve(gram: Tensor, rhs: Tensor, damping: float) -> Tensor:
    """``(λI + K)⁻¹ rhs`` for one damping (see :func:`damped_solver`)."""
    return damped_solver(gram, [damping])(0, rhs)


__all__ = [
    "SINGLE_THREAD_EIGH_MAX",
    "DampedGram",
    "damped_solver",
    "eigen_solve",
    "eigh_psd",
    "factor_damped_gram",
    "gram_resolution",
    "inverse_square_norm",
    "relative",
    "single_threaded",
    "symmetric_eigh",
]
