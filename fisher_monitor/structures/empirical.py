"""The EF side of a block, shared by the ``block`` and ``kron`` structures.

Both compare against the exact empirical Fisher block ``EF = UUᵀ`` (``U = [g_1 … g_N]/√N``),
so the damped ``B = EF + λI`` is solved once per layer and damping through the small Gram
matrix ``K_U = UᵀU``: with the mean weights ``a = 1/√N · 1`` (``g = Ua``),
``B⁻¹g = U(λI + K_U)⁻¹a``, ``gᵀB⁻¹g = aᵀK_U b``, ``‖B⁻¹g‖² = bᵀK_U b`` and
``(1/N) Σ_n g_nᵀ B⁻¹ g_n = tr(K_U (λI + K_U)⁻¹) = N − λ tr((λI + K_U)⁻¹)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fisher_monitor.linalg import eigh_psd, factor_damped_gram, gram_resolution, relative


# ------------------------------------------------------------------------- the EF side
@dataclass
class EmpiricalSolve:
    """Everything about ``B = UUᵀ + λI`` that the structures share for one damping.

    Attributes:
        coefficients: ``b = (λI + K_U)⁻¹ a`` so that ``B⁻¹g = U b``.
        ef_projection: ``gᵀB⁻¹g = aᵀ K_U b``.
        ef_sq: ``‖B⁻¹g‖² = bᵀ K_U b``.
        per_sample: ``tr(K_U (λI + K_U)⁻¹)``.
        logdet_ratio: ``log det(I + K_U/λ) = log det B − D log λ``.
        relative_error: Rounding estimate for ``ef_projection``, ``ef_sq`` and
            ``per_sample`` (see :class:`NumericalHealth`); ``None`` when not estimated.
    """

    coefficients: Tensor
    ef_projection: Tensor
    ef_sq: Tensor
    per_sample: Tensor
    logdet_ratio: Tensor
    relative_error: Tensor | None = None


def mean_weights(n: int, like: Tensor) -> Tensor:
    """``a = 1/√N · 1``, the weights with ``g = Ua`` (``N`` entries, ``like``'s type)."""
    return torch.full((n,), n**-0.5, dtype=like.dtype, device=like.device)


def spectral_empirical(
    mu: Tensor,
    vectors: Tensor,
    a: Tensor,
    dampings: Sequence[float],
    mu_error: Tensor,
    coordinate_error: Tensor | None = None,
    unresolved: int = 0,
) -> list[EmpiricalSolve]:
    """EF-side solves from ``K_U = W diag(μ) Wᵀ`` (``W``: ``N × n'`` orthonormal).

    ``a``'s component outside ``range(W)`` (when ``n' < N``) sees ``λI`` only. With
    ``â = Wᵀa``: ``gᵀB⁻¹g = Σ μâ²/(μ+λ)``, ``‖B⁻¹g‖² = Σ μâ²/(μ+λ)²``,
    ``tr(K_U(λI + K_U)⁻¹) = Σ μ/(μ+λ)``, ``log det(I + K_U/λ) = Σ log(1 + μ/λ)``.

    The rounding estimate propagates ``mu_error`` (scalar or one per eigenvalue): the
    three sums have derivatives in ``μ`` bounded by ``â²/(μ+λ)²``, ``λâ²/(μ+λ)²`` and
    ``λ/(μ+λ)²``. Where the basis itself came from a Gram matrix, every squared
    coordinate ``μâ²`` of ``g`` is uncertain by ``coordinate_error`` too, and
    ``unresolved`` directions below the Gram's resolution were dropped (each may have
    carried that much of ``g`` at ``μ ≈ 0``).
    """
    a_hat = vectors.mT @ a
    outside = a - vectors @ a_hat if vectors.shape[1] < a.shape[0] else None
    a_hat_sq = a_hat.square()
    weighted = mu * a_hat_sq
    solves = []
    for damping in dampings:
        shifted = mu + damping
        coefficients = vectors @ (a_hat / shifted)
        if outside is not None:
            coefficients = coefficients + outside / damping
        ef_projection = (weighted / shifted).sum()
        ef_sq = (weighted / shifted.square()).sum()
        per_sample = (mu / shifted).sum()
        sensitivity = mu_error / shifted.square()
        sq_error = (a_hat_sq * sensitivity).sum()
        projection_error = damping * sq_error
        per_sample_error = damping * sensitivity.expand_as(mu).sum()
        if coordinate_error is not None:
            # the coordinates of g move by about √τ in all; dropped directions count at μ = 0
            nearest = damping if unresolved else shifted.min()
            sq_error = sq_error + coordinate_error / nearest**2
            projection_error = projection_error + coordinate_error / nearest
            per_sample_error = per_sample_error + coordinate_error * unresolved / damping
        error = torch.stack(
            [
                relative(sq_error, ef_sq),
                relative(projection_error, ef_projection),
                relative(per_sample_error, per_sample),
            ]
        ).max()
        solves.append(
            EmpiricalSolve(
                coefficients=coefficients,
                ef_projection=ef_projection,
                ef_sq=ef_sq,
                per_sample=per_sample,
                logdet_ratio=torch.log1p(mu / damping).sum(),
                relative_error=error,
            )
        )
    return solves


def _cholesky_empirical(
    gram_u: Tensor, a: Tensor, damping: float, resolution: Tensor
) -> EmpiricalSolve:
    n = gram_u.shape[0]
    factor = factor_damped_gram(gram_u, damping)
    b = factor.solve(a)
    k_b = gram_u @ b
    ef_projection, ef_sq = a @ k_b, b @ k_b
    per_sample = n - damping * factor.trace_inverse
    b_sq = b.square().sum()
    # λ Σ 1/(μ+λ)² ≤ Σ 1/(μ+λ) = tr((λI + K_U)⁻¹)
    error = torch.stack(
        [
            relative(resolution * b_sq, ef_sq),
            relative(resolution * damping * b_sq, ef_projection),
            relative(resolution * factor.trace_inverse, per_sample),
        ]
    ).max()
    return EmpiricalSolve(
        coefficients=b,
        ef_projection=ef_projection,
        ef_sq=ef_sq,
        per_sample=per_sample,
        logdet_ratio=factor.logdet_ratio,
        relative_error=error,
    )


def empirical_solves(
    gram_u: Tensor, dampings: Sequence[float], dimension: int | None = None
) -> list[EmpiricalSolve]:
    """Solve with the damped empirical Fisher for every damping, one factorisation shared.

    One eigendecomposition of ``K_U`` serves the whole list when it has more than one
    value (``N × N`` is small); a single damping takes one Cholesky factorisation. Pass
    the result to both the ``block`` routes and
    :func:`~fisher_monitor.structures.kron.statistics.kronecker_statistics` (keyword
    ``empirical``) when both structures are measured: they share ``U``.

    Args:
        gram_u: ``K_U = UᵀU``, ``N × N``.
        dampings: Damping values λ (> 0).
        dimension: Length ``D`` of the gradients ``K_U`` was formed from (for the rounding
            estimate; default ``N``).

    Returns:
        One :class:`EmpiricalSolve` per damping, in order.
    """
    n = gram_u.shape[0]
    a = mean_weights(n, gram_u)
    resolution = gram_resolution(gram_u, dimension if dimension is not None else n)
    if len(dampings) == 1:
        return [_cholesky_empirical(gram_u, a, dampings[0], resolution)]
    mu, vectors = eigh_psd(gram_u)
    return spectral_empirical(mu, vectors, a, dampings, resolution)


def empirical_solve(gram_u: Tensor, damping: float) -> EmpiricalSolve:
    """Solve with the damped empirical Fisher through its ``N × N`` Gram matrix.

    Args:
        gram_u: ``K_U = UᵀU``, ``N × N``.
        damping: λ > 0.

    Returns:
        The shared EF-side quantities.
    """
    return empirical_solves(gram_u, [damping])[0]


def check_empirical(empirical: Sequence[EmpiricalSolve] | None, dampings: Sequence[float]) -> None:
    """Refuse precomputed EF-side solves that do not match the dampings one to one."""
    if empirical is not None and len(empirical) != len(dampings):
        raise ValueError(
            f"Got {len(empirical)} precomputed EF solves for {len(dampings)} dampings; "
            "pass one per damping, in the same order (see empirical_solves)."
        )


__all__ = [
    "EmpiricalSolve",
    "check_empirical",
    "empirical_solve",
    "empirical_solves",
    "mean_weights",
    "spectral_empirical",
]
