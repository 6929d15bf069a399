"""The dense route of the ``block`` structure: layers with fewer parameters than columns.

When a layer has ``D`` parameters and the factors of F and EF have more than ``D``
columns (a bias, a tiny layer, or a huge probe batch), the ``D × D`` matrices are the
cheaper representation. With fewer samples than parameters and few dampings, ``F + λI``
is factorised by Cholesky and the EF side goes through its ``N × N`` Gram
(:func:`factored_dense_statistics`); otherwise both matrices are diagonalised once and
every damping costs ``O(D²)`` (:func:`dense_statistics`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fisher_monitor.linalg import inverse_cholesky_factor, square_norm, symmetric_eigh
from fisher_monitor.metrics import DampedStatistics, LayerStatistics
from fisher_monitor.structures.empirical import EmpiricalSolve


def _numerically_psd(eigenvalues: Tensor) -> Tensor:
    """Zero the eigenvalues of a PSD matrix that are below its rounding level.

    ``eigh`` returns the zero eigenvalues of a rank-deficient matrix as ``±D·ε·‖M‖`` noise;
    against a small λ such noise would count as curvature (for instance in
    ``Σ μ/(μ + λ)``, which must not exceed the rank). The threshold is the one
    ``matrix_rank`` uses.
    """
    floor = eigenvalues.abs().max() * eigenvalues.numel() * torch.finfo(eigenvalues.dtype).eps
    return torch.where(eigenvalues > floor, eigenvalues, torch.zeros_like(eigenvalues))


def dense_statistics(
    fisher: Tensor,
    empirical: Tensor,
    gradient: Tensor,
    dampings: Sequence[float],
    dimension: int | None = None,
) -> LayerStatistics:
    r"""Additive statistics of dense ``F_S`` against dense ``EF_S``.

    With the eigendecompositions ``F = Q diag(α) Qᵀ`` and ``EF = P diag(μ) Pᵀ``:
    ``log det A − log det B = Σ log(1 + α_i/λ) − Σ log(1 + μ_i/λ)`` and
    ``tr(B A⁻¹) − D = tr(A⁻¹(EF − F)) = Σ_i [Qᵀ EF Q]_ii/(α_i + λ) − Σ_i α_i/(α_i + λ)``.

    Args:
        fisher: ``D × D`` symmetric positive semi-definite Fisher block.
        empirical: ``D × D`` empirical Fisher block.
        gradient: Mean gradient, ``D`` entries.
        dampings: Damping values λ (> 0).
        dimension: Number of parameters the block stands for (default: ``gradient``'s
            size). Larger when the blocks are coordinates in a basis of a subspace outside
            which F, EF and g vanish: there A and B are ``λI`` and add only to the dimension.

    Returns:
        The layer's additive statistics.
    """
    f = 0.5 * (fisher + fisher.T)
    e = 0.5 * (empirical + empirical.T)
    g = gradient.reshape(-1)
    dimension = g.numel() if dimension is None else dimension
    alpha, q = symmetric_eigh(f)
    mu, p = symmetric_eigh(e)
    alpha, mu = _numerically_psd(alpha), _numerically_psd(mu)
    g_f = q.T @ g
    g_e = p.T @ g
    e_in_f = torch.einsum("ij,ik,kj->j", q, e, q)  # diag(Qᵀ EF Q)
    damped = []
    for damping in dampings:
        a = alpha + damping
        b = mu + damping
        nat = q @ (g_f / a)
        ef = p @ (g_e / b)
        trace_term = (e_in_f / a).sum() - (alpha / a).sum()
        logdet_term = torch.log1p(alpha / damping).sum() - torch.log1p(mu / damping).sum()
        damped.append(
            DampedStatistics(
                damping_mass=torch.as_tensor(damping * dimension, dtype=g.dtype, device=g.device),
                kl=0.5 * (trace_term + logdet_term),
                grad_sq=g.square().sum(),
                nat_sq=nat.square().sum(),
                ef_sq=ef.square().sum(),
                nat_ef=nat @ ef,
                nat_projection=(g_f.square() / a).sum(),
                ef_projection=(g_e.square() / b).sum(),
                ef_projection_per_sample=(mu / b).sum(),
            )
        )
    return LayerStatistics(
        dimension=dimension,
        trace_f=torch.diagonal(f).sum(),
        trace_ef=torch.diagonal(e).sum(),
        frob_f_sq=f.square().sum(),
        frob_ef_sq=e.square().sum(),
        inner=(f * e).sum(),
        frob_diff_sq=(e - f).square().sum(),
        damped=damped,
    )


def factored_dense_statistics(
    fisher: Tensor,
    samples: Tensor,
    gradient: Tensor,
    dampings: Sequence[float],
    empirical: Sequence[EmpiricalSolve],
    gram_u: Tensor,
) -> tuple[LayerStatistics, list[Tensor]] | None:
    """Dense ``F_b`` by Cholesky factorisations, the EF side through its ``N × N`` Gram.

    For a layer with fewer parameters than Fisher columns but more than samples (``N < D
    ≤ R``): ``A = F + λI = LLᵀ`` per damping gives ``A⁻¹g``, ``log det(I + F/λ)`` and
    ``tr(A⁻¹F) = D − λ‖L⁻¹‖²_F``; with ``U`` the ``D × N`` per-sample gradients over ``√N``,
    ``tr(A⁻¹EF) = ‖L⁻¹U‖²_F`` and ``⟨EF, F⟩ = tr(UᵀFU)``, and ``B⁻¹g = U(λI + K_U)⁻¹a`` comes
    from the shared EF-side solves. About ``4D³/3 + 2D²N`` operations per damping, against
    the two ``D × D`` eigendecompositions of :func:`dense_statistics` (ten times that).

    Args:
        fisher: ``D × D`` Fisher block (symmetric; its upper triangle is read).
        samples: ``U`` (``D × N``).
        gradient: ``g`` (``D``).
        dampings: Damping values λ (> 0), fewer than five.
        empirical: The EF-side solves, one per damping.
        gram_u: ``K_U = UᵀU``.

    Returns:
        The statistics and the natural directions ``A⁻¹g`` per damping, or ``None`` where
        ``F + λI`` is not numerically positive definite (then :func:`dense_statistics`).
    """
    g = gradient.reshape(-1)
    dimension = g.numel()
    damped, natural = [], []
    for damping, ef in zip(dampings, empirical, strict=True):
        factor = inverse_cholesky_factor(fisher, damping)
        if factor is None:
            return None
        nat = factor.solve(g)
        trace_fisher = dimension - damping * factor.trace_inverse()  # tr(A⁻¹F)
        trace_empirical = square_norm(factor.inverse @ samples)  # tr(A⁻¹EF)
        ef_direction = samples @ ef.coefficients  # B⁻¹g
        kl = 0.5 * (trace_empirical - trace_fisher + factor.logdet_ratio - ef.logdet_ratio)
        damped.append(
            DampedStatistics(
                damping_mass=torch.as_tensor(damping * dimension, dtype=g.dtype, device=g.device),
                kl=kl,
                grad_sq=g.square().sum(),
                nat_sq=nat.square().sum(),
                ef_sq=ef.ef_sq,
                nat_ef=nat @ ef_direction,
                nat_projection=g @ nat,
                ef_projection=ef.ef_projection,
                ef_projection_per_sample=ef.per_sample,
            )
        )
        natural.append(nat)
    trace_f, frob_f_sq = torch.diagonal(fisher).sum(), square_norm(fisher)
    frob_ef_sq, inner = gram_u.square().sum(), (samples * (fisher @ samples)).sum()
    statistics = LayerStatistics(
        dimension=dimension,
        trace_f=trace_f,
        trace_ef=torch.diagonal(gram_u).sum(),
        frob_f_sq=frob_f_sq,
        frob_ef_sq=frob_ef_sq,
        inner=inner,
        frob_diff_sq=(frob_f_sq + frob_ef_sq - 2.0 * inner).clamp_min(0.0),
        damped=damped,
    )
    return statistics, natural
