"""The root route of the ``block`` structure: singular value decompositions of the factors.

The factors are written in an orthonormal basis of their range (the parameters themselves
for a small materialised layer; :func:`outer_product_roots` builds one for a layer whose
columns are outer products) and decomposed by SVD. Singular values are accurate to
``ε‖V‖``, so the curvature ``σ²`` keeps about twice as many correct digits in its small
directions as a Gram matrix would: a layer whose curvature spans many orders of magnitude
(near-duplicate samples, inputs far below the bias' constant 1) stays right. Costs an SVD
of a ``k × R`` matrix: taken where that is small (:func:`prefer_root_route`).

The *joint basis* (:func:`joint_basis_block_statistics`) is the same computation in an
orthonormal basis of ``range([V, U])`` obtained from the joint Gram matrix: the Gram
route's fallback when Woodbury's formulas would cancel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fisher_monitor.linalg import gram_resolution, relative, symmetric_eigh
from fisher_monitor.metrics import DampedStatistics, LayerStatistics
from fisher_monitor.structures.base import NumericalHealth
from fisher_monitor.structures.block.sums import (
    BlockStatistics,
    assemble_damped,
    assemble_undamped,
    worst_error,
)
from fisher_monitor.structures.empirical import EmpiricalSolve, mean_weights, spectral_empirical

#: Largest ``k·R·min(k, R)`` for which :func:`prefer_root_route` chooses the root route
#: (about 10 ms of SVD on two CPU cores, ``k = R = 256``).
ROOT_ROUTE_MAX_WORK = 256**3


# ---------------------------------------------------------------------- root route
def prefer_root_route(rows: int, columns: int) -> bool:
    """Whether the SVD of a ``rows × columns`` root is cheap enough to replace the Grams.

    Args:
        rows: ``k``, the dimension of the subspace the root is written in.
        columns: ``R`` (square-root columns) or ``R + N`` (with the EF root).

    Returns:
        ``k·R·min(k, R) ≤`` :data:`ROOT_ROUTE_MAX_WORK`.
    """
    return rows * columns * min(rows, columns) <= ROOT_ROUTE_MAX_WORK


def outer_product_roots(
    inputs: Tensor, sqrt: Tensor, output_grads: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """``V`` and ``U`` of a layer with outer-product columns, in a small orthonormal basis.

    For a ``Linear`` layer on ``(N, I)`` inputs the columns are ``v_{r,n} = vec(s_{r,n} x̃_nᵀ)``
    and ``u_n = vec(δ_n x̃_nᵀ)/√N`` (row-major ``vec``; ``s`` carries the ``1/√N`` of a mean,
    as in :class:`~fisher_monitor.factors.OuterProductFactors`). With a Householder
    QR ``X̃ᵀ = Q_x T`` (``T``: ``k_x × N``, ``k_x = min(I, N)``; column ``n`` of ``T`` is
    ``x̃_n`` in the basis ``Q_x``, to backward error ``ε‖x̃_n‖``) and an orthonormal basis
    ``Q_s`` of the output vectors' span (the standard basis when ``O`` is at most their
    number), ``v_{r,n} = (Q_s ⊗ Q_x)(Q_sᵀs_{r,n} ⊗ t_n)``: an isometry, so every statistic is
    the same in the coordinates returned. No Gram matrix is formed, so curvature many
    orders of magnitude below the largest (near-duplicate inputs, inputs scaled far below
    the bias' constant 1) keeps its digits.

    Args:
        inputs: ``x̃``, ``N × I`` (augmented with the bias column where there is one).
        sqrt: ``s``, ``R_n × N × O`` square-root factors at the output.
        output_grads: ``δ``, ``N × O`` per-sample output gradients (only needed without
            coefficients).

    Returns:
        ``(V̂, Û)``: ``k × R`` with column ``r·N + n`` (the package's column order) and
        ``k × N`` (``None`` without ``output_grads``), ``k = k_s·k_x``.
    """
    n, width = inputs.shape
    columns, _, outputs = sqrt.shape
    if width > n:
        basis_x, t = torch.linalg.qr(inputs.mT)  # X̃ᵀ = Q_x T
    else:
        t = inputs.mT
    vectors = sqrt.reshape(-1, outputs)  # row r·N + n: s_{r,n}
    if output_grads is not None:
        vectors = torch.cat([vectors, output_grads], dim=0)
    if outputs > vectors.shape[0]:
        basis_s, coordinates = torch.linalg.qr(vectors.mT)
        vectors = coordinates.mT
    k_s = vectors.shape[1]
    sqrt_hat = vectors[: columns * n].reshape(columns, n, k_s)
    v_root = (sqrt_hat.unsqueeze(3) * t.mT.reshape(1, n, 1, -1)).reshape(columns * n, -1).mT
    u_root = None
    if output_grads is not None:
        delta_hat = vectors[columns * n :]
        u_root = (delta_hat.unsqueeze(2) * t.mT.unsqueeze(1)).reshape(n, -1).mT / n**0.5
    return v_root, u_root


def root_block_statistics(
    v_root: Tensor,
    dimension: int,
    dampings: Sequence[float],
    *,
    coefficients: Tensor | None = None,
    u_root: Tensor | None = None,
) -> BlockStatistics:
    """Block statistics from explicit factors via their singular value decompositions.

    ``v_root`` (``k × R``) and ``u_root`` (``k × N``) are ``V`` and ``U`` in an orthonormal
    basis of a ``k``-dimensional subspace that contains both (the parameters themselves,
    or the coordinates of :func:`outer_product_roots`); outside it F, EF and g vanish, A
    and B act as ``λI``, and only the dimension ``D`` counts. With ``V = PΣWᵀ``
    (``α = σ²``), ``U``'s coordinates ``M = PᵀU`` and its remainder ``U_⊥ = U − PM``,
    ``U = P_U diag(√μ) W_Uᵀ`` and ``ĝ = Ma``, ``g_⊥ = U_⊥a``, ``h = √μ ⊙ W_Uᵀa``:

    - ``A⁻¹g = P ĝ/(α+λ) + g_⊥/λ`` and ``B⁻¹g = P_U h/(μ+λ)``;
    - ``tr(A⁻¹EF) = Σ_i ‖M_i‖²/(α_i+λ) + ‖U_⊥‖²_F/λ``, ``⟨EF, F⟩ = Σ_i α_i ‖M_i‖²``;
    - ``log det A − log det B = Σ log(1 + α/λ) − Σ log(1 + μ/λ)``.

    With ``coefficients`` ``B`` (``U = VB``), ``M = ΣWᵀB`` exactly and ``U_⊥ = 0``: ``g``
    stays inside the range of ``V`` and nothing is divided by λ alone. Singular values are
    accurate to about ``ε‖V‖``, so small curvature ``σ²`` keeps about twice the digits an
    eigendecomposition of the Gram matrix would give it; no eigenvalue is clipped.

    Args:
        v_root: ``V`` in the basis, ``k × R``.
        dimension: ``D``, the number of parameters of the block (``≥ k``).
        dampings: Damping values λ (> 0).
        coefficients: ``B`` (``R × N``) with ``U = VB``.
        u_root: ``U`` in the basis, ``k × N`` (when there are no coefficients).

    Returns:
        Statistics, health (route ``"root"``; every ``σ`` taken as uncertain by
        ``δσ = ε √max(k, R) ‖V‖``) and the EF-side solves.

    Raises:
        ValueError: If neither or both of ``coefficients`` and ``u_root`` are given.
    """
    if (coefficients is None) == (u_root is None):
        raise ValueError("Pass exactly one of coefficients (U = VB) and u_root.")
    return _root_statistics(v_root, dimension, dampings, coefficients, u_root)


def _root_statistics(
    v_root: Tensor,
    dimension: int,
    dampings: Sequence[float],
    coefficients: Tensor | None,
    u_root: Tensor | None,
    resolution: Tensor | None = None,
    unresolved: int = 0,
) -> BlockStatistics:
    """:func:`root_block_statistics`; ``resolution`` and ``unresolved`` for Gram-made roots.

    With ``resolution`` τ (roots computed from a Gram matrix, :func:`joint_basis_statistics`),
    every ``σ²`` and ``μ`` is uncertain by τ, the coordinates of ``g`` by ``√τ`` in norm, and
    ``unresolved`` directions were dropped below it. The undamped statistics are
    ``tr F = Σ α``, ``tr EF = Σ μ``, ``‖F‖²_F = Σ α²``, ``‖EF‖²_F = Σ μ²`` and
    ``⟨EF, F⟩ = Σ_i α_i ‖M_i‖²``.
    """
    spectra = _root_spectra(v_root, coefficients, u_root)
    # EF-side solves: (λI + K_U)⁻¹a with K_U = W_U diag(μ) W_Uᵀ
    if resolution is None:
        route = "root"
        empirical = spectral_empirical(
            spectra.mu, spectra.wt_u.mT, spectra.a, dampings, torch.zeros_like(spectra.mu)
        )
    else:
        route = "joint"
        empirical = spectral_empirical(
            spectra.mu, spectra.wt_u.mT, spectra.a, dampings, resolution, resolution, unresolved
        )
    damped, errors = [], []
    for damping, ef in zip(dampings, empirical, strict=True):
        statistics, nat_sq, nat_projection = _root_damped(spectra, damping, dimension, ef)
        damped.append(statistics)
        if resolution is None:
            errors += _root_route_errors(spectra, damping, ef, coefficients is not None)
        else:
            errors += _joint_errors(
                spectra, damping, ef, resolution, unresolved, nat_sq, nat_projection
            )
    alpha, mu = spectra.alpha, spectra.mu
    undamped = assemble_undamped(
        dimension,
        alpha.sum(),
        mu.sum(),
        alpha.square().sum(),
        mu.square().sum(),
        (alpha * spectra.row_sq).sum(),
    )
    return BlockStatistics(
        statistics=LayerStatistics(**undamped, damped=damped),
        health=NumericalHealth(route, worst_error(errors, v_root)),
        empirical=empirical,
    )


@dataclass
class _RootSpectra:
    """``V``, ``U`` and ``g`` in the singular bases of the root route (:func:`_root_spectra`).

    Attributes:
        sigma: ``σ``, the singular values of ``V = PΣWᵀ``; ``alpha``: ``α = σ²``.
        row_sq: ``‖M_i‖²``, the squared rows of ``M = PᵀU``.
        outside_sq: ``‖U_⊥‖²_F`` (``None`` when ``U`` lies in ``range(V)``).
        sigma_u: ``√μ``, the singular values of ``U = P_U diag(√μ) W_Uᵀ``; ``mu``: ``μ``.
        wt_u: ``W_Uᵀ``.
        a: The mean weights (``g = Ua``).
        a_hat: ``W_Uᵀa``; ``h``: ``√μ ⊙ W_Uᵀa``.
        g_hat: ``ĝ = Ma``; ``g_out``: ``g_⊥ = U_⊥a`` and ``g_out_sq``: ``‖g_⊥‖²`` (``None``
            when ``U`` lies in ``range(V)``).
        grad_sq: ``‖g‖² = ‖ĝ‖² + ‖g_⊥‖²``.
        basis_inner: ``P_UᵀP``.
        out_inner: ``P_Uᵀg_⊥`` (``None`` with ``g_out``).
        size: ``max(k, R, N)``, the size the singular values' rounding grows with.
    """

    sigma: Tensor
    alpha: Tensor
    row_sq: Tensor
    outside_sq: Tensor | None
    sigma_u: Tensor
    mu: Tensor
    wt_u: Tensor
    a: Tensor
    a_hat: Tensor
    h: Tensor
    g_hat: Tensor
    g_out: Tensor | None
    g_out_sq: Tensor | None
    grad_sq: Tensor
    basis_inner: Tensor
    out_inner: Tensor | None
    size: int


def _root_spectra(
    v_root: Tensor, coefficients: Tensor | None, u_root: Tensor | None
) -> _RootSpectra:
    """The SVDs ``V = PΣWᵀ`` and ``U = P_U diag(√μ) W_Uᵀ`` and ``g = Ua`` in their bases.

    ``U``'s coordinates are ``M = PᵀU`` and its remainder ``U_⊥ = U − PM``; with
    ``coefficients`` ``B`` (``U = VB``), ``M = ΣWᵀB`` exactly and ``U_⊥ = 0`` (the rows of
    ``M`` are then ``U`` in ``P``'s basis, and so is the EF root that is decomposed).
    """
    k, r = v_root.shape
    p, sigma, wt = torch.linalg.svd(v_root, full_matrices=False)
    alpha = sigma.square()
    if coefficients is not None:
        m = sigma.unsqueeze(1) * (wt @ coefficients)  # U = P M, rows in P's basis
        ef_root, outside = m, None
    else:
        assert u_root is not None
        m = p.mT @ u_root
        outside = u_root - p @ m if p.shape[1] < k else None
        ef_root = u_root
    n = ef_root.shape[1]
    a = mean_weights(n, v_root)
    p_u, sigma_u, wt_u = torch.linalg.svd(ef_root, full_matrices=False)
    mu = sigma_u.square()
    # g in both eigenbases
    g_hat = m @ a
    g_out = outside @ a if outside is not None else None
    a_hat = wt_u @ a
    h = sigma_u * a_hat
    basis_inner = p_u.mT if coefficients is not None else p_u.mT @ p  # P_Uᵀ P
    out_inner = p_u.mT @ g_out if g_out is not None else None
    grad_sq = g_hat.square().sum() + (g_out.square().sum() if g_out is not None else 0.0)
    row_sq = m.square().sum(dim=1)
    outside_sq = outside.square().sum() if outside is not None else None
    g_out_sq = g_out.square().sum() if g_out is not None else None
    return _RootSpectra(
        sigma=sigma,
        alpha=alpha,
        row_sq=row_sq,
        outside_sq=outside_sq,
        sigma_u=sigma_u,
        mu=mu,
        wt_u=wt_u,
        a=a,
        a_hat=a_hat,
        h=h,
        g_hat=g_hat,
        g_out=g_out,
        g_out_sq=g_out_sq,
        grad_sq=grad_sq,
        basis_inner=basis_inner,
        out_inner=out_inner,
        size=max(k, r, n),
    )


def _root_damped(
    spectra: _RootSpectra, damping: float, dimension: int, ef: EmpiricalSolve
) -> tuple[DampedStatistics, Tensor, Tensor]:
    """One damping's statistics on the root route.

    ``A⁻¹g = P ĝ/(α+λ) + g_⊥/λ`` and ``B⁻¹g = P_U h/(μ+λ)``, so
    ``‖A⁻¹g‖² = Σ ĝ²/(α+λ)² + ‖g_⊥‖²/λ²``, ``gᵀA⁻¹g = Σ ĝ²/(α+λ) + ‖g_⊥‖²/λ`` and
    ``⟨A⁻¹g, B⁻¹g⟩ = zᵀ(P_UᵀP) y + zᵀP_Uᵀg_⊥/λ`` with ``y = ĝ/(α+λ)``, ``z = h/(μ+λ)``;
    ``tr(A⁻¹EF) − tr(A⁻¹F) = Σ_i (‖M_i‖² − α_i)/(α_i+λ) + ‖U_⊥‖²_F/λ`` and
    ``log det A − log det B = Σ log(1 + α/λ) − Σ log(1 + μ/λ)`` make the KL divergence.

    Returns:
        The statistics, and ``‖A⁻¹g‖²`` and ``gᵀA⁻¹g`` for the rounding estimate.
    """
    g_hat, alpha = spectra.g_hat, spectra.alpha
    shifted = alpha + damping
    y = g_hat / shifted  # A⁻¹g in P's basis (inside part)
    z = spectra.h / (spectra.mu + damping)  # B⁻¹g in P_U's basis
    nat_sq = y.square().sum()
    nat_projection = (g_hat * y).sum()
    nat_ef = z @ (spectra.basis_inner @ y)
    trace_term = ((spectra.row_sq - alpha) / shifted).sum()
    if spectra.g_out is not None:
        nat_sq = nat_sq + spectra.g_out_sq / damping**2
        nat_projection = nat_projection + spectra.g_out_sq / damping
        nat_ef = nat_ef + (z @ spectra.out_inner) / damping
    if spectra.outside_sq is not None:
        trace_term = trace_term + spectra.outside_sq / damping
    logdet_term = torch.log1p(alpha / damping).sum() - ef.logdet_ratio
    kl = 0.5 * (trace_term + logdet_term)
    statistics = assemble_damped(
        damping, dimension, kl, spectra.grad_sq, nat_sq, nat_ef, nat_projection, ef
    )
    return statistics, nat_sq, nat_projection


def _root_route_errors(
    spectra: _RootSpectra, damping: float, ef: EmpiricalSolve, through_coefficients: bool
) -> list[Tensor]:
    """:func:`_root_errors` for one damping; stores the EF side's in ``ef.relative_error``."""
    nat_errors, ef_errors = _root_errors(
        torch.finfo(spectra.sigma.dtype).eps,
        damping,
        spectra.sigma,
        spectra.g_hat,
        spectra.g_out,
        through_coefficients,
        spectra.sigma_u,
        spectra.a_hat,
        ef,
        spectra.size,
    )
    ef.relative_error = torch.stack(ef_errors).max()
    return [*nat_errors, ef.relative_error]


def _joint_errors(
    spectra: _RootSpectra,
    damping: float,
    ef: EmpiricalSolve,
    resolution: Tensor,
    unresolved: int,
    nat_sq: Tensor,
    nat_projection: Tensor,
) -> list[Tensor]:
    """Rounding estimates of ``‖A⁻¹g‖²`` and ``gᵀA⁻¹g`` for roots made from a Gram matrix.

    Every ``σ²`` is uncertain by τ (``resolution``), so ``ĝ²/(α+λ)²`` moves by about
    ``2ĝ²τ/(α+λ)³`` and ``ĝ²/(α+λ)`` by ``ĝ²τ/(α+λ)²``; the coordinates of ``g`` are
    uncertain by ``√τ`` in all, which counts at the nearest ``α + λ`` (at ``α = 0``, i.e.
    ``λ``, when ``unresolved`` directions were dropped): ``τ/(α+λ)²`` and ``τ/(α+λ)``.
    The EF side's estimate is the one its solve carries.
    """
    g_hat = spectra.g_hat
    shifted = spectra.alpha + damping
    nearest = damping if unresolved else shifted.min()
    sq_error = (2.0 * g_hat.square() * resolution / shifted**3).sum()
    sq_error = sq_error + resolution / nearest**2
    projection_error = (g_hat.square() * resolution / shifted.square()).sum()
    projection_error = projection_error + resolution / nearest
    return [
        relative(sq_error, nat_sq),
        relative(projection_error, nat_projection),
        ef.relative_error,
    ]


def _root_errors(
    eps: float,
    damping: float,
    sigma: Tensor,
    g_hat: Tensor,
    g_out: Tensor | None,
    through_coefficients: bool,
    sigma_u: Tensor,
    a_hat: Tensor,
    ef: EmpiricalSolve,
    size: int,
) -> tuple[list[Tensor], list[Tensor]]:
    """First-order rounding estimates of the root route, for one damping.

    Singular values are uncertain by ``δσ = ε √size max σ`` (so ``δα = 2σδσ + δσ²``), the
    coordinates of ``g`` by ``ε √size ‖U‖`` each (through the coefficients: by
    ``ε √size σ_i ‖b‖``, rows scaled by σ), and so is its part outside the range of ``V``,
    which ``1/λ`` amplifies. Returns the relative errors of ``A⁻¹g`` (as a vector: cosines
    move by about as much) and ``gᵀA⁻¹g``, and of ``B⁻¹g``, ``gᵀB⁻¹g`` and the per-sample
    projection.
    """
    root_eps = eps * math.sqrt(size)
    shifted = sigma.square() + damping
    delta_sigma = root_eps * sigma.max()
    delta_alpha = 2.0 * sigma * delta_sigma + delta_sigma**2
    if through_coefficients:
        b_hat = g_hat / sigma.clamp_min(torch.finfo(sigma.dtype).tiny)
        delta_g = delta_sigma * b_hat.abs() + root_eps * sigma * b_hat.norm()
    else:
        delta_g = root_eps * sigma_u.max() * torch.ones_like(g_hat)
    nat_vector = (g_hat * delta_alpha / shifted.square()).norm() + (delta_g / shifted).norm()
    nat_projection_error = (
        g_hat.square() * delta_alpha / shifted.square() + 2.0 * g_hat.abs() * delta_g / shifted
    ).sum()
    nat_sq = (g_hat / shifted).square().sum()
    nat_projection = (g_hat.square() / shifted).sum()
    if g_out is not None:
        delta_out = root_eps * sigma_u.max()
        nat_vector = nat_vector + delta_out / damping
        nat_projection_error = (
            nat_projection_error + (2.0 * g_out.norm() * delta_out + delta_out**2) / damping
        )
        nat_sq = nat_sq + g_out.square().sum() / damping**2
        nat_projection = nat_projection + g_out.square().sum() / damping
    mu = sigma_u.square()
    ef_shifted = mu + damping
    delta_sigma_u = root_eps * sigma_u.max()
    delta_mu = 2.0 * sigma_u * delta_sigma_u + delta_sigma_u**2
    h = sigma_u * a_hat
    delta_h = delta_sigma_u * a_hat.abs() + root_eps * sigma_u
    ef_vector = (h * delta_mu / ef_shifted.square()).norm() + (delta_h / ef_shifted).norm()
    ef_projection_error = (
        h.square() * delta_mu / ef_shifted.square() + 2.0 * h.abs() * delta_h / ef_shifted
    ).sum()
    per_sample_error = (damping * delta_mu / ef_shifted.square()).sum()
    return (
        [relative(nat_vector, nat_sq.sqrt()), relative(nat_projection_error, nat_projection)],
        [
            relative(ef_vector, ef.ef_sq.sqrt()),
            relative(ef_projection_error, ef.ef_projection),
            relative(per_sample_error, ef.per_sample),
        ],
    )


def joint_basis_block_statistics(
    gram_u: Tensor,
    gram_v: Tensor,
    gram_uv: Tensor,
    dimension: int,
    dampings: Sequence[float],
    *,
    empirical: Sequence[EmpiricalSolve] | None = None,
) -> BlockStatistics:
    """:func:`joint_basis_statistics` with its rounding estimate.

    ``empirical`` is accepted for a uniform interface and ignored: the EF side is
    recomputed in the joint basis, consistently with the Fisher side.
    """
    del empirical
    n, r = gram_uv.shape
    joint = torch.cat(
        [torch.cat([gram_v, gram_uv.mT], dim=1), torch.cat([gram_uv, gram_u], dim=1)], dim=0
    )
    eigenvalues, vectors = symmetric_eigh(joint)
    eps = torch.finfo(joint.dtype).eps
    # eigenvalues below the Gram's rounding level are indistinguishable from zero: the
    # directions they stand for are numerically in the null space of [V, U]
    keep = eigenvalues > eigenvalues.max() * joint.shape[0] * eps
    coordinates = eigenvalues[keep].sqrt().unsqueeze(1) * vectors[:, keep].mT  # Λ^{1/2}Qᵀ
    resolution = torch.maximum(
        gram_resolution(joint, dimension), eigenvalues.max() * joint.shape[0] * eps
    )
    return _root_statistics(
        coordinates[:, :r],
        dimension,
        dampings,
        None,
        coordinates[:, r:],
        resolution,
        unresolved=int(keep.numel() - keep.sum()),
    )


def joint_basis_statistics(
    gram_u: Tensor,
    gram_v: Tensor,
    gram_uv: Tensor,
    dimension: int,
    dampings: Sequence[float],
) -> LayerStatistics:
    """The statistics computed in an orthonormal basis of ``range([V, U])``.

    With ``W = [V, U]`` and ``K_W = WᵀW = QΛQᵀ`` (eigenvalues above rounding level kept),
    the columns of ``WQΛ^{-1/2}`` are orthonormal and span both factors; in that basis
    ``V`` and ``U`` have coordinates ``Λ^{1/2}Qᵀ`` (columns split as in ``W``), and the
    root route (:func:`root_block_statistics`) takes over. Costs an eigendecomposition of
    size ``R + N``: the fallback for when Woodbury's formulas would cancel.

    Args:
        gram_u: ``K_U`` (``N × N``).
        gram_v: ``K_V`` (``R × R``).
        gram_uv: ``K_UV`` (``N × R``).
        dimension: ``D``.
        dampings: Damping values λ (> 0).

    Returns:
        The block's additive statistics.
    """
    return joint_basis_block_statistics(gram_u, gram_v, gram_uv, dimension, dampings).statistics


__all__ = [
    "ROOT_ROUTE_MAX_WORK",
    "joint_basis_block_statistics",
    "joint_basis_statistics",
    "outer_product_roots",
    "prefer_root_route",
    "root_block_statistics",
]
