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
    # This runs over every parameter of the network: a handful of reused buffers and
    # dot products, since fresh large temporaries cost page faults on every call.
    diff = e - f
    g_sq_sum = torch.dot(g, g)
    inv_a, inv_b = torch.empty_like(f), torch.empty_like(f)
    g_a, g_b = torch.empty_like(f), torch.empty_like(f)
    damped = []
    for damping in dampings:
        torch.add(f, damping, out=inv_a).reciprocal_()
        torch.add(e, damping, out=inv_b).reciprocal_()
        torch.mul(g, inv_a, out=g_a)  # A⁻¹g
        torch.mul(g, inv_b, out=g_b)  # B⁻¹g
        nat_projection, nat_sq = torch.dot(g_a, g), torch.dot(g_a, g_a)
        ef_projection, ef_sq = torch.dot(g_b, g), torch.dot(g_b, g_b)
        nat_ef = torch.dot(g_a, g_b)
        per_sample = torch.dot(e, inv_b)
        u = torch.mul(diff, inv_a, out=g_a)  # g_a is free again
        kl = 0.5 * u.sub_(torch.log1p(u, out=g_b)).sum()
        damped.append(
            DampedStatistics(
                damping_mass=torch.as_tensor(damping * f.numel(), dtype=f.dtype, device=f.device),
                kl=kl,
                grad_sq=g_sq_sum,
                nat_sq=nat_sq,
                ef_sq=ef_sq,
                nat_ef=nat_ef,
                nat_projection=nat_projection,
                ef_projection=ef_projection,
                ef_projection_per_sample=per_sample,
            )
        )
    return LayerStatistics(
        dimension=f.numel(),
        trace_f=f.sum(),
        trace_ef=e.sum(),
        frob_f_sq=torch.dot(f, f),
        frob_ef_sq=torch.dot(e, e),
        inner=torch.dot(f, e),
        frob_diff_sq=torch.dot(diff, diff),
        damped=damped,
    )
