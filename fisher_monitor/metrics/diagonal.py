"""Statistics of diagonal F and EF (the ``diag`` structure).

With ``f = diag F``, ``e = diag EF`` and the mean gradient ``g`` of one layer, the damped
matrices are ``A = diag(f) + λ`` and ``B = diag(e) + λ``, so every quantity is a sum of
elementwise terms. The per-sample projection needs no per-sample gradients:
``(1/N) Σ_n g_nᵀ B⁻¹ g_n = Σ_i e_i / (e_i + λ)`` because ``e_i = (1/N) Σ_n g_{n,i}²``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fisher_monitor.metrics.statistics import DampedStatistics, LayerStatistics


def diagonal_statistics(
    fisher: Tensor, empirical: Tensor, gradient: Tensor, dampings: Sequence[float]
) -> LayerStatistics:
    r"""Additive statistics of ``F_S = diag(fisher)`` against ``EF_S = diag(empirical)``.

    The KL divergence is evaluated as ``½ Σ_i [u_i − log(1 + u_i)]`` with
    ``u_i = (e_i − f_i) / (f_i + λ)``, which equals
    ``½[tr(B A⁻¹) − D + log det A − log det B]`` without the cancellation of the
    ``− D`` term.

    Args:
        fisher: Diagonal of the Fisher, any shape (flattened).
        empirical: Diagonal of the empirical Fisher, same number of entries.
        gradient: Mean gradient ``g``, same number of entries.
        dampings: Damping values λ (> 0) of this layer.

    Returns:
        The layer's additive statistics.
    """
    f = fisher.reshape(-1)
    e = empirical.reshape(-1)
    g = gradient.reshape(-1)
    diff = e - f
    damped = []
    g_sq = g.square()
    for damping in dampings:
        a = f + damping
        b = e + damping
        u = diff / a
        damped.append(
            DampedStatistics(
                damping_mass=torch.as_tensor(damping * f.numel(), dtype=f.dtype, device=f.device),
                kl=0.5 * (u - torch.log1p(u)).sum(),
                grad_sq=g_sq.sum(),
                nat_sq=(g_sq / a.square()).sum(),
                ef_sq=(g_sq / b.square()).sum(),
                nat_ef=(g_sq / (a * b)).sum(),
                nat_projection=(g_sq / a).sum(),
                ef_projection=(g_sq / b).sum(),
                ef_projection_per_sample=(e / b).sum(),
            )
        )
    return LayerStatistics(
        dimension=f.numel(),
        trace_f=f.sum(),
        trace_ef=e.sum(),
        frob_f_sq=f.square().sum(),
        frob_ef_sq=e.square().sum(),
        inner=(f * e).sum(),
        frob_diff_sq=diff.square().sum(),
        damped=damped,
    )
