"""Statistics of a Kronecker-factored Fisher against the exact empirical Fisher block.

A layer whose weight (with the bias as an extra input column) is an ``O × I`` matrix
has the Kronecker-factored Fisher ``F_S = G ⊗ A`` (``G``: ``O × O`` output factor,
``A``: ``I × I`` input factor; row-major vectorisation) and the exact empirical Fisher
``EF = UUᵀ`` with columns ``u_n = vec(M_n)/√N``, ``M_n`` the per-sample gradient as an
``O × I`` matrix. With ``G = Q_G diag(γ) Q_Gᵀ`` and ``A = Q_A diag(α) Q_Aᵀ``, ``F_S`` is
diagonal in the rotated coordinates ``M̂ = Q_Gᵀ M Q_A`` with eigenvalues ``γ_i α_j``, so

- ``tr F_S = tr G · tr A``, ``‖F_S‖²_F = ‖G‖²_F ‖A‖²_F``;
- ``⟨EF, F_S⟩_F = (1/N) Σ_n Σ_ij M̂_n,ij² γ_i α_j``;
- ``A_S = F_S + λI`` is diagonal (``Λ_ij = γ_i α_j + λ``) after rotation;
- ``tr(B A_S⁻¹) − D = (1/N) Σ_n Σ_ij M̂_n,ij² / Λ_ij − Σ_ij γ_i α_j / Λ_ij``;
- ``log det A_S − log det B = Σ_ij log(1 + γ_i α_j/λ) − log det(I + K_U/λ)``.

The EF side (``B⁻¹g``, the per-sample projection) uses the Gram matrix as in
:mod:`fisher_monitor.metrics.lowrank`. When the per-sample gradients are outer
products ``M_n = δ_n x_nᵀ`` (a linear layer without weight sharing), nothing of size
``N × O × I`` is formed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fisher_monitor.metrics.lowrank import empirical_solve
from fisher_monitor.metrics.statistics import DampedStatistics, LayerStatistics


@dataclass
class OuterSamples:
    """Per-sample gradients given as outer products ``M_n = δ_n x_nᵀ``.

    Attributes:
        output_grads: ``δ``, shape ``N × O``.
        inputs: ``x``, shape ``N × I``.
    """

    output_grads: Tensor
    inputs: Tensor


Samples = Tensor | OuterSamples


def _rotate(samples: Samples, q_out: Tensor, q_in: Tensor) -> Samples:
    if isinstance(samples, OuterSamples):
        return OuterSamples(samples.output_grads @ q_out, samples.inputs @ q_in)
    return torch.einsum("oi,noj,jk->nik", q_out, samples, q_in)


def _weighted_square_sum(samples: Samples, weights: Tensor) -> Tensor:
    """``Σ_n Σ_ij M_n,ij² W_ij``."""
    if isinstance(samples, OuterSamples):
        return ((samples.output_grads.square() @ weights) * samples.inputs.square()).sum()
    return (samples.square() * weights).sum()


def _sample_inner(samples: Samples, matrix: Tensor) -> Tensor:
    """``(⟨M_n, W⟩_F)_n``, shape ``N``."""
    if isinstance(samples, OuterSamples):
        return ((samples.output_grads @ matrix) * samples.inputs).sum(dim=1)
    return torch.einsum("noi,oi->n", samples, matrix)


def _sample_sum(samples: Samples) -> Tensor:
    """``Σ_n M_n`` (``O × I``)."""
    if isinstance(samples, OuterSamples):
        return samples.output_grads.T @ samples.inputs
    return samples.sum(dim=0)


def kronecker_statistics(
    input_factor: Tensor,
    output_factor: Tensor,
    samples: Samples,
    gram_u: Tensor,
    dampings: Sequence[float],
) -> LayerStatistics:
    """Additive statistics of ``F_S = G ⊗ A`` against ``EF = UUᵀ``.

    Args:
        input_factor: ``A`` (``I × I``), symmetric positive semi-definite.
        output_factor: ``G`` (``O × O``), symmetric positive semi-definite.
        samples: The columns of ``U`` times ``√N``: per-sample gradients ``M_n``
            (``N × O × I``) or :class:`OuterSamples`; the EF is ``(1/N) Σ_n vec M_n vec M_nᵀ``.
        gram_u: ``K_U = UᵀU`` (``N × N``), consistent with ``samples``.
        dampings: Damping values λ (> 0).

    Returns:
        The layer's additive statistics.
    """
    n = gram_u.shape[0]
    alpha, q_in = torch.linalg.eigh(0.5 * (input_factor + input_factor.T))
    gamma, q_out = torch.linalg.eigh(0.5 * (output_factor + output_factor.T))
    spectrum = gamma.clamp_min(0.0).unsqueeze(1) * alpha.clamp_min(0.0).unsqueeze(0)
    rotated = _rotate(samples, q_out, q_in)
    grad = _sample_sum(rotated) / n  # rotated mean gradient ĝ
    grad_sq = grad.square().sum()
    trace_ef = torch.diagonal(gram_u).sum()
    frob_ef_sq = gram_u.square().sum()
    frob_f_sq = spectrum.square().sum()
    inner = _weighted_square_sum(rotated, spectrum) / n
    damped = []
    for damping in dampings:
        shifted = spectrum + damping
        nat = grad / shifted
        ef = empirical_solve(gram_u, damping)
        # B⁻¹g = U b = Σ_n b_n M̂_n/√N
        nat_ef = (ef.coefficients * _sample_inner(rotated, nat)).sum() / n**0.5
        trace_term = _weighted_square_sum(rotated, 1.0 / shifted) / n - (spectrum / shifted).sum()
        logdet_term = torch.log1p(spectrum / damping).sum() - ef.logdet_ratio
        damped.append(
            DampedStatistics(
                damping_mass=torch.as_tensor(
                    damping * spectrum.numel(), dtype=gram_u.dtype, device=gram_u.device
                ),
                kl=0.5 * (trace_term + logdet_term),
                grad_sq=grad_sq,
                nat_sq=nat.square().sum(),
                ef_sq=ef.ef_sq,
                nat_ef=nat_ef,
                nat_projection=(grad * nat).sum(),
                ef_projection=ef.ef_projection,
                ef_projection_per_sample=ef.per_sample,
            )
        )
    return LayerStatistics(
        dimension=spectrum.numel(),
        trace_f=spectrum.sum(),
        trace_ef=trace_ef,
        frob_f_sq=frob_f_sq,
        frob_ef_sq=frob_ef_sq,
        inner=inner,
        frob_diff_sq=(frob_ef_sq + frob_f_sq - 2.0 * inner).clamp_min(0.0),
        damped=damped,
    )
