"""The dense route of the ``block`` structure: layers with fewer parameters than columns.

When a layer has ``D`` parameters and the factors of F and EF have more than ``D``
columns (a bias, a tiny layer, or a huge probe batch), the ``D × D`` matrices are the
cheaper representation. Both matrices are diagonalised once; every damping then costs
``O(D²)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fisher_monitor.linalg import symmetric_eigh
from fisher_monitor.metrics import DampedStatistics, LayerStatistics


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
