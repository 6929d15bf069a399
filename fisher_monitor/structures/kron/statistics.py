"""Statistics of a Kronecker-factored Fisher against the exact empirical Fisher block.

A layer whose weight (with the bias as an extra input column) is an ``O × I`` matrix
has the Kronecker-factored Fisher ``F_S = G ⊗ A`` (``G``: ``O × O`` output factor,
``A``: ``I × I`` input factor; row-major vectorisation) and the exact empirical Fisher
``EF = UUᵀ`` with columns ``u_n = vec(M_n)/√N``, ``M_n`` the per-sample gradient as an
``O × I`` matrix. With ``G = Q_G diag(γ) Q_Gᵀ`` and ``A = Q_A diag(α) Q_Aᵀ`` restricted to
their ranges, ``F_S`` has eigenvalues ``γ_i α_j`` on ``range(G) ⊗ range(A)`` and 0 on the
rest, where ``A_S = F_S + λI`` acts as ``λ``. Writing ``M̂ = Q_Gᵀ M Q_A`` and
``R(M) = M − Q_G M̂ Q_Aᵀ`` (the part outside the range):

- ``tr F_S = tr G · tr A``, ``‖F_S‖²_F = ‖G‖²_F ‖A‖²_F``,
  ``⟨EF, F_S⟩_F = (1/N) Σ_n Σ_ij M̂_n,ij² γ_i α_j``;
- ``A_S⁻¹ vec M = vec(Q_G (M̂ / Λ) Q_Aᵀ + R(M)/λ)`` with ``Λ_ij = γ_i α_j + λ``;
- ``tr(B A_S⁻¹) − D = (1/N) Σ_n [Σ_ij M̂_n,ij²/Λ_ij + ‖R(M_n)‖²/λ] − Σ_ij γ_i α_j/Λ_ij``;
- ``log det A_S − log det B = Σ_ij log(1 + γ_i α_j/λ) − log det(I + K_U/λ)``.

Residuals ``R(·)`` are formed explicitly, never as ``‖M‖² − ‖M̂‖²``, which would cancel.
A factor is diagonalised through its smaller side: ``A = XᵀX`` with ``X`` of ``k < I``
rows is diagonalised through the ``k × k`` Gram ``XXᵀ`` (a probe of ``N`` samples makes
the input factor of a wide layer rank ``≤ N``), and then ``A`` itself is never formed. The
EF side (``B⁻¹g``, the per-sample projection) uses the Gram matrix as in
:mod:`fisher_monitor.structures.empirical`, and is shared with the block structure. When the
per-sample gradients are outer products ``M_n = δ_n x_nᵀ`` (a linear layer without weight
sharing), nothing of size ``N × O × I`` is formed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fisher_monitor.factors import OuterSamples
from fisher_monitor.linalg import symmetric_eigh
from fisher_monitor.metrics import DampedStatistics, LayerStatistics
from fisher_monitor.structures.empirical import EmpiricalSolve, empirical_solves

Samples = Tensor | OuterSamples


@dataclass
class FactorBasis:
    """Eigenvalues and orthonormal eigenvectors of a PSD factor on (at least) its range.

    Attributes:
        eigenvalues: ``r`` non-negative eigenvalues.
        vectors: ``dim × r`` orthonormal eigenvectors.
        complete: Whether ``r = dim`` (then nothing lies outside the basis).
    """

    eigenvalues: Tensor
    vectors: Tensor
    complete: bool

    def project_out(self, matrix: Tensor, side: str) -> Tensor:
        """Remove the basis components: ``(I − QQᵀ) M`` (``side="left"``) or ``M (I − QQᵀ)``."""
        q = self.vectors
        if side == "left":
            return matrix - q @ (q.T @ matrix)
        return matrix - (matrix @ q) @ q.T


def factor_basis(factor: Tensor | None, root: Tensor | None = None) -> FactorBasis:
    """Diagonalise a PSD Kronecker factor ``factor = rootᵀ root``, through the smaller side.

    With a wide root (``k < dim`` rows), the ``k × k`` Gram ``root rootᵀ = W diag(μ) Wᵀ`` is
    diagonalised instead; ``rootᵀ w/√μ`` span the factor's range (directions with ``μ``
    below the Gram's rounding level are dropped). One QR pass re-orthonormalises them,
    and the eigenvalues in the new basis are ``‖root q_i‖²``: the ``dim × dim`` factor is
    never formed.

    Args:
        factor: ``dim × dim`` factor, or ``None`` when ``root`` is given.
        root: Optional ``k × dim`` matrix with ``rootᵀ root = factor``.

    Returns:
        The basis (complete when the factor itself was diagonalised).

    Raises:
        ValueError: If neither ``factor`` nor ``root`` is given.
    """
    if root is None or root.shape[0] >= root.shape[1]:
        if factor is None:
            if root is None:
                raise ValueError("factor_basis needs the factor or its root.")
            factor = root.mT @ root
        eigenvalues, vectors = symmetric_eigh(factor)
        return FactorBasis(eigenvalues.clamp_min(0.0), vectors, complete=True)
    mu, w = symmetric_eigh(root @ root.mT)
    keep = mu > mu.max().clamp_min(0.0) * root.shape[0] * torch.finfo(mu.dtype).eps
    mu, w = mu[keep], w[:, keep]
    vectors = root.mT @ (w / mu.sqrt())
    # one re-orthonormalisation pass guards against rounding in tiny eigenvalues
    vectors, _ = torch.linalg.qr(vectors)
    eigenvalues = (root @ vectors).square().sum(dim=0)
    return FactorBasis(eigenvalues, vectors, complete=False)


def _rotate(samples: Samples, out_basis: FactorBasis, in_basis: FactorBasis) -> Samples:
    if isinstance(samples, OuterSamples):
        return OuterSamples(
            samples.output_grads @ out_basis.vectors, samples.inputs @ in_basis.vectors
        )
    return torch.einsum("or,noi,is->nrs", out_basis.vectors, samples, in_basis.vectors)


def _residual_square_norms(
    samples: Samples, rotated: Samples, out_basis: FactorBasis, in_basis: FactorBasis
) -> Tensor | None:
    """``‖R(M_n)‖²`` per sample, or ``None`` when both bases are complete."""
    if out_basis.complete and in_basis.complete:
        return None
    if isinstance(samples, OuterSamples):
        assert isinstance(rotated, OuterSamples)
        # R(δxᵀ) = δ⊥ xᵀ + δ∥ x⊥ᵀ with δ⊥ ⟂ δ∥, so the squared norms add up
        out_residual = (
            torch.zeros_like(samples.output_grads[:, 0])
            if out_basis.complete
            else out_basis.project_out(samples.output_grads.T, "left").square().sum(dim=0)
        )
        in_residual = (
            torch.zeros_like(samples.inputs[:, 0])
            if in_basis.complete
            else in_basis.project_out(samples.inputs.T, "left").square().sum(dim=0)
        )
        return out_residual * samples.inputs.square().sum(dim=1) + (
            rotated.output_grads.square().sum(dim=1) * in_residual
        )
    inside = torch.einsum("or,nrs,is->noi", out_basis.vectors, rotated, in_basis.vectors)
    return (samples - inside).square().sum(dim=(1, 2))


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
    input_factor: Tensor | None,
    output_factor: Tensor | None,
    samples: Samples,
    gram_u: Tensor,
    dampings: Sequence[float],
    input_root: Tensor | None = None,
    output_root: Tensor | None = None,
    *,
    empirical: Sequence[EmpiricalSolve] | None = None,
) -> LayerStatistics:
    """Additive statistics of ``F_S = G ⊗ A`` against ``EF = UUᵀ``.

    Args:
        input_factor: ``A`` (``I × I``), symmetric positive semi-definite; may be ``None``
            when ``input_root`` is given (then it is formed only if the root is not wide).
        output_factor: ``G`` (``O × O``); may be ``None`` when ``output_root`` is given.
        samples: The columns of ``U`` times ``√N``: per-sample gradients ``M_n``
            (``N × O × I``) or :class:`OuterSamples`; the EF is ``(1/N) Σ_n vec M_n vec M_nᵀ``.
        gram_u: ``K_U = UᵀU`` (``N × N``), consistent with ``samples``.
        dampings: Damping values λ (> 0).
        input_root: Optional ``k × I`` matrix with ``rootᵀ root = A`` (see :func:`factor_basis`).
        output_root: Optional ``k × O`` matrix with ``rootᵀ root = G``.
        empirical: Optional EF-side solves shared with the block structure
            (:func:`~fisher_monitor.structures.empirical.empirical_solves` or
            :attr:`~fisher_monitor.structures.block.sums.BlockStatistics.empirical`), one
            per damping.

    Returns:
        The layer's additive statistics.

    Raises:
        ValueError: If a factor and its root are both missing, or ``empirical`` does not
            have one entry per damping.
    """
    empirical = _shared_empirical(
        input_factor, output_factor, input_root, output_root, gram_u, dampings, empirical
    )
    in_basis = factor_basis(input_factor, input_root)
    out_basis = factor_basis(output_factor, output_root)
    side = _fisher_side(samples, gram_u.shape[0], out_basis, in_basis)
    trace_ef = torch.diagonal(gram_u).sum()
    frob_ef_sq = gram_u.square().sum()
    inner = _weighted_square_sum(side.rotated, side.spectrum) / side.n
    damped = [
        _damped_statistics(side, damping, ef, gram_u)
        for damping, ef in zip(dampings, empirical, strict=True)
    ]
    # tr(G ⊗ A) = tr G tr A and ‖G ⊗ A‖² = ‖G‖²‖A‖², from the eigenvalues (the bases span
    # the factors' ranges, so nothing is missed)
    frob_f_sq = out_basis.eigenvalues.square().sum() * in_basis.eigenvalues.square().sum()
    return LayerStatistics(
        dimension=side.dimension,
        trace_f=out_basis.eigenvalues.sum() * in_basis.eigenvalues.sum(),
        trace_ef=trace_ef,
        frob_f_sq=frob_f_sq,
        frob_ef_sq=frob_ef_sq,
        inner=inner,
        frob_diff_sq=(frob_ef_sq + frob_f_sq - 2.0 * inner).clamp_min(0.0),
        damped=damped,
    )


def _shared_empirical(
    input_factor: Tensor | None,
    output_factor: Tensor | None,
    input_root: Tensor | None,
    output_root: Tensor | None,
    gram_u: Tensor,
    dampings: Sequence[float],
    empirical: Sequence[EmpiricalSolve] | None,
) -> Sequence[EmpiricalSolve]:
    """The EF-side solves: ``empirical`` checked, or computed from ``K_U`` when not given."""
    if empirical is None:
        dimension_hint = _dimension(input_factor, input_root) * _dimension(
            output_factor, output_root
        )
        return empirical_solves(gram_u, dampings, dimension_hint)
    if len(empirical) != len(dampings):
        raise ValueError(
            f"Got {len(empirical)} precomputed EF solves for {len(dampings)} dampings; "
            "pass one per damping, in the same order."
        )
    return empirical


@dataclass
class _FisherSide:
    """What every damping's statistics of ``F_S = G ⊗ A`` share (see :func:`_fisher_side`).

    Attributes:
        samples: ``M_n`` as given.
        rotated: ``M̂_n = Q_Gᵀ M_n Q_A``.
        spectrum: ``γ_i α_j`` (``r_G × r_A``).
        dimension: ``D = O · I``.
        n: ``N``.
        grad: ``ĝ = Q_Gᵀ g Q_A``.
        grad_residual: ``R(g)`` (``O × I``), ``None`` when both bases are complete.
        grad_residual_sq: ``‖R(g)‖²``.
        grad_sq: ``‖g‖²``.
        residual_sum: ``(1/N) Σ_n ‖R(M_n)‖²``, ``None`` when both bases are complete.
    """

    samples: Samples
    rotated: Samples
    spectrum: Tensor
    dimension: int
    n: int
    grad: Tensor
    grad_residual: Tensor | None
    grad_residual_sq: Tensor
    grad_sq: Tensor
    residual_sum: Tensor | None


def _fisher_side(
    samples: Samples, n: int, out_basis: FactorBasis, in_basis: FactorBasis
) -> _FisherSide:
    """The samples and the mean gradient ``g = (1/N) Σ_n M_n`` in the factors' eigenbases.

    ``ĝ = (1/N) Σ_n M̂_n = Q_Gᵀ g Q_A``; where a basis is incomplete, the part of ``g``
    outside, ``R(g) = g − Q_G ĝ Q_Aᵀ``, is formed explicitly (never as ``‖g‖² − ‖ĝ‖²``)
    and ``‖g‖² = ‖ĝ‖² + ‖R(g)‖²``.
    """
    spectrum = out_basis.eigenvalues.unsqueeze(1) * in_basis.eigenvalues.unsqueeze(0)
    dimension = out_basis.vectors.shape[0] * in_basis.vectors.shape[0]
    rotated = _rotate(samples, out_basis, in_basis)
    residual_sq = _residual_square_norms(samples, rotated, out_basis, in_basis)
    grad = _sample_sum(rotated) / n  # ĝ = Q_Gᵀ g Q_A
    grad_inside_sq = grad.square().sum()
    if residual_sq is None:
        grad_residual = None
        grad_residual_sq = torch.zeros_like(grad_inside_sq)
        grad_sq = grad_inside_sq
    else:
        mean = _sample_sum(samples) / n  # g as an O × I matrix
        grad_residual = mean - out_basis.vectors @ grad @ in_basis.vectors.mT
        grad_residual_sq = grad_residual.square().sum()
        grad_sq = grad_inside_sq + grad_residual_sq
    residual_sum = residual_sq.sum() / n if residual_sq is not None else None
    return _FisherSide(
        samples,
        rotated,
        spectrum,
        dimension,
        n,
        grad,
        grad_residual,
        grad_residual_sq,
        grad_sq,
        residual_sum,
    )


def _damped_statistics(
    side: _FisherSide, damping: float, ef: EmpiricalSolve, gram_u: Tensor
) -> DampedStatistics:
    """The statistics of ``A_S = F_S + λI`` against ``B = EF + λI`` for one damping λ.

    With ``Λ_ij = γ_i α_j + λ``, ``A_S⁻¹g = Q_G (ĝ/Λ) Q_Aᵀ + R(g)/λ``, so
    ``‖A_S⁻¹g‖² = ‖ĝ/Λ‖² + ‖R(g)‖²/λ²`` and ``gᵀA_S⁻¹g = ⟨ĝ, ĝ/Λ⟩ + ‖R(g)‖²/λ``;
    ``B⁻¹g = U b = Σ_n b_n M_n/√N`` gives ``⟨A_S⁻¹g, B⁻¹g⟩ = (1/√N) Σ_n b_n ⟨M_n, A_S⁻¹g⟩``
    with ``⟨M_n, A_S⁻¹g⟩ = ⟨M̂_n, ĝ/Λ⟩ + ⟨M_n, R(g)⟩/λ``. The KL's trace and
    log-determinant terms are those of the module docstring.
    """
    n, rotated, spectrum = side.n, side.rotated, side.spectrum
    shifted = spectrum + damping
    nat = side.grad / shifted
    inner_nat = _sample_inner(rotated, nat)
    if side.grad_residual is not None:
        inner_nat = inner_nat + _sample_inner(side.samples, side.grad_residual) / damping
    nat_ef = (ef.coefficients * inner_nat).sum() / n**0.5
    trace_term = _weighted_square_sum(rotated, 1.0 / shifted) / n - (spectrum / shifted).sum()
    if side.residual_sum is not None:
        trace_term = trace_term + side.residual_sum / damping
    logdet_term = torch.log1p(spectrum / damping).sum() - ef.logdet_ratio
    return DampedStatistics(
        damping_mass=torch.as_tensor(
            damping * side.dimension, dtype=gram_u.dtype, device=gram_u.device
        ),
        kl=0.5 * (trace_term + logdet_term),
        grad_sq=side.grad_sq,
        nat_sq=nat.square().sum() + side.grad_residual_sq / damping**2,
        ef_sq=ef.ef_sq,
        nat_ef=nat_ef,
        nat_projection=(side.grad * nat).sum() + side.grad_residual_sq / damping,
        ef_projection=ef.ef_projection,
        ef_projection_per_sample=ef.per_sample,
    )


def _dimension(factor: Tensor | None, root: Tensor | None) -> int:
    if factor is not None:
        return factor.shape[0]
    if root is None:
        raise ValueError("kronecker_statistics needs each factor or its root.")
    return root.shape[1]
