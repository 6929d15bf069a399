"""Statistics of exact per-layer blocks from low-rank factors, never forming ``D × D``.

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

Three routes compute them, each suited to a regime:

- **Gram route** (:func:`lowrank_statistics`, :func:`gram_block_statistics`): Cholesky
  factorisations of ``λI + K`` per damping, or one eigendecomposition of ``K`` shared by
  every damping of a list. Cheapest for wide layers. A float64 Gram matrix resolves the
  spectrum of ``K`` only down to its rounding level ``τ ≈ ε √D max_i K_ii``: curvature
  directions below it (near-duplicate samples, a weight whose inputs are many orders of
  magnitude smaller than its bias' constant input) are blurred, and where they matter at
  the given damping the statistics are off. The route estimates by how much (the
  :class:`NumericalHealth` it returns).
- **Root route** (:func:`root_block_statistics`): singular value decompositions of the
  factors themselves, written in an orthonormal basis of their range
  (:func:`outer_product_roots` builds one for a layer whose columns are outer products).
  Singular values are accurate to ``ε‖V‖``, so the curvature ``σ²`` keeps about twice as
  many correct digits in its small directions as a Gram matrix would. Costs an SVD of a
  ``k × R`` matrix: used when that is small (:func:`prefer_root_route`).
- **Joint basis** (:func:`joint_basis_statistics`): the root route in an orthonormal
  basis of ``range([V, U])`` obtained from the joint Gram matrix, for the Woodbury case
  when ``g − Vc`` would cancel.

With coefficients ``B`` (``R × N``, ``U = VB``: each per-sample gradient written in the
Fisher's own square-root columns, known in closed form for the exact Fisher), ``g`` lies
in the range of ``V`` by construction and the push-through identity
``A⁻¹V = V(λI + K_V)⁻¹`` gives ``A⁻¹g = V(λI + K_V)⁻¹Ba`` with no division by λ.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fisher_monitor.metrics.statistics import DampedStatistics, LayerStatistics

#: With at least this many dampings, one eigendecomposition of ``K_V`` replaces the
#: per-damping Cholesky factorisations (an ``R × R`` ``eigh`` costs about as much as five
#: Cholesky passes with their solves; measured with ``benchmarks/metrics_micro.py``).
SPECTRAL_MIN_DAMPINGS = 5

#: Largest ``k·R·min(k, R)`` for which :func:`prefer_root_route` chooses the root route
#: (about 10 ms of SVD on two CPU cores, ``k = R = 256``).
ROOT_ROUTE_MAX_WORK = 256**3


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


# ----------------------------------------------------------------------------- health
@dataclass
class NumericalHealth:
    """How far rounding may have moved a layer's damped statistics.

    ``relative_error`` is a first-order estimate of the relative error of the damped
    statistics, propagated from the resolution of what the route factorised:

    - Gram route: every eigenvalue of ``K_V`` and ``K_U`` uncertain by
      ``τ ≈ ε √D max_i K_ii``; the estimate covers ``‖A⁻¹g‖²``, ``gᵀA⁻¹g``, ``‖B⁻¹g‖²``,
      ``gᵀB⁻¹g`` and ``(1/N) Σ_n g_nᵀB⁻¹g_n``;
    - joint basis: the same, plus the coordinates of ``g`` uncertain by ``√τ`` and the
      directions dropped below the Gram's resolution (where ``g`` may hide that much);
    - root route: every singular value uncertain by ``δσ ≈ ε √k ‖V‖`` and every
      coordinate of ``g`` by about as much (much less through coefficients); the estimate
      covers the vectors ``A⁻¹g`` and ``B⁻¹g`` and the projections.

    The largest over those and over the dampings is reported. Cosines move by about as
    much (absolutely). The KL divergence, a difference of terms, is not covered. The
    estimate is pessimistic, often by a factor 10–100 on the Gram route, because rounding
    errors partly cancel; below ``1e-3`` the metrics are good to the digits a report
    shows. Above it, compute the layer by the root route where affordable, or note it.

    Attributes:
        route: ``"gram"``, ``"root"`` or ``"joint"`` (see the module docstring).
        relative_error: The estimate (0-d tensor, on the statistics' device: reading it
            costs one synchronisation, so read it together with the statistics).
    """

    route: str
    relative_error: Tensor


@dataclass
class BlockStatistics:
    """A block's statistics, how reliable they are, and the shared EF-side solves.

    Attributes:
        statistics: The additive statistics (as :func:`lowrank_statistics` returns them).
        health: The rounding estimate.
        empirical: One :class:`EmpiricalSolve` per damping, reusable by
            :func:`~fisher_monitor.metrics.kronecker.kronecker_statistics` (same ``U``).
        natural: Where ``U = VB``, per damping ``c₀ = (λI + K_V)⁻¹Ba`` with
            ``A⁻¹g = Vc₀`` (the directions then need no second factorisation); else ``None``.
    """

    statistics: LayerStatistics
    health: NumericalHealth
    empirical: list[EmpiricalSolve]
    natural: list[Tensor] | None = None


def as_dense(coefficients) -> Tensor:
    """``B`` as a tensor: a block-sparse ``CoefficientMatrix`` is formed, a dense one passes.

    The Gram paths concatenate ``B`` with other right-hand sides; they hold ``R × R``
    matrices, larger than ``B``, anyway.
    """
    return coefficients.dense() if hasattr(coefficients, "dense") else coefficients


def _relative(error: Tensor, value: Tensor) -> Tensor:
    """``error / |value|``, 0 where both vanish."""
    tiny = torch.finfo(value.dtype).tiny
    return error / value.abs().clamp_min(tiny)


def _gram_resolution(gram: Tensor, length: int) -> Tensor:
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


def _eigh(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a PSD Gram matrix, eigenvalues clipped at zero.

    The matrix is PSD by construction, so negative eigenvalues are rounding; clipping
    them at exactly zero (not at a threshold) keeps every ``log(1 + σ/λ)`` finite and
    every ``σ/(σ + λ)`` in ``[0, 1]``. ``eigh`` reads only the lower triangle.
    """
    eigenvalues, vectors = symmetric_eigh(gram)
    return eigenvalues.clamp_min(0.0), vectors


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


def _mean_weights(n: int, like: Tensor) -> Tensor:
    return torch.full((n,), n**-0.5, dtype=like.dtype, device=like.device)


def _spectral_empirical(
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
                _relative(sq_error, ef_sq),
                _relative(projection_error, ef_projection),
                _relative(per_sample_error, per_sample),
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
            _relative(resolution * b_sq, ef_sq),
            _relative(resolution * damping * b_sq, ef_projection),
            _relative(resolution * factor.trace_inverse, per_sample),
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
    the result to both :func:`lowrank_statistics` and
    :func:`~fisher_monitor.metrics.kronecker.kronecker_statistics` (keyword
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
    a = _mean_weights(n, gram_u)
    resolution = _gram_resolution(gram_u, dimension if dimension is not None else n)
    if len(dampings) == 1:
        return [_cholesky_empirical(gram_u, a, dampings[0], resolution)]
    mu, vectors = _eigh(gram_u)
    return _spectral_empirical(mu, vectors, a, dampings, resolution)


def empirical_solve(gram_u: Tensor, damping: float) -> EmpiricalSolve:
    """Solve with the damped empirical Fisher through its ``N × N`` Gram matrix.

    Args:
        gram_u: ``K_U = UᵀU``, ``N × N``.
        damping: λ > 0.

    Returns:
        The shared EF-side quantities.
    """
    return empirical_solves(gram_u, [damping])[0]


def _check_empirical(empirical: Sequence[EmpiricalSolve] | None, dampings: Sequence[float]):
    if empirical is not None and len(empirical) != len(dampings):
        raise ValueError(
            f"Got {len(empirical)} precomputed EF solves for {len(dampings)} dampings; "
            "pass one per damping, in the same order (see empirical_solves)."
        )


# --------------------------------------------------------------------------- helpers
def _undamped(
    dimension: int,
    trace_f: Tensor,
    trace_ef: Tensor,
    frob_f_sq: Tensor,
    frob_ef_sq: Tensor,
    inner: Tensor,
) -> dict:
    return dict(
        dimension=dimension,
        trace_f=trace_f,
        trace_ef=trace_ef,
        frob_f_sq=frob_f_sq,
        frob_ef_sq=frob_ef_sq,
        inner=inner,
        frob_diff_sq=(frob_ef_sq + frob_f_sq - 2.0 * inner).clamp_min(0.0),
    )


def _damped(
    damping: float,
    dimension: int,
    kl: Tensor,
    grad_sq: Tensor,
    nat_sq: Tensor,
    nat_ef: Tensor,
    nat_projection: Tensor,
    ef: EmpiricalSolve,
) -> DampedStatistics:
    return DampedStatistics(
        damping_mass=torch.as_tensor(damping * dimension, dtype=kl.dtype, device=kl.device),
        kl=kl,
        grad_sq=grad_sq,
        nat_sq=nat_sq.clamp_min(0.0),
        ef_sq=ef.ef_sq,
        nat_ef=nat_ef,
        nat_projection=nat_projection,
        ef_projection=ef.ef_projection,
        ef_projection_per_sample=ef.per_sample,
    )


def _worst(errors: list[Tensor], like: Tensor) -> Tensor:
    if not errors:
        return torch.zeros((), dtype=like.dtype, device=like.device)
    return torch.stack(errors).max()


# ---------------------------------------------------------------------- Gram route
def gram_block_statistics(
    gram_u: Tensor,
    gram_v: Tensor,
    gram_uv: Tensor,
    dimension: int,
    dampings: Sequence[float],
    coefficients: Tensor | None = None,
    *,
    empirical: Sequence[EmpiricalSolve] | None = None,
) -> BlockStatistics:
    """Block statistics from Gram matrices, with their rounding estimate.

    See :func:`lowrank_statistics` for the arguments; ``empirical`` takes precomputed
    EF-side solves (:func:`empirical_solves`, one per damping) instead of solving again.

    Returns:
        Statistics, health and the EF-side solves.
    """
    _check_empirical(empirical, dampings)
    n, r = gram_uv.shape
    if empirical is None:
        empirical = empirical_solves(gram_u, dampings, dimension)
    undamped = _undamped(
        dimension,
        torch.diagonal(gram_v).sum(),
        torch.diagonal(gram_u).sum(),
        gram_v.square().sum(),
        gram_u.square().sum(),
        gram_uv.square().sum(),
    )
    resolution = _gram_resolution(gram_v, dimension)
    a = _mean_weights(n, gram_v)
    if coefficients is None:  # ‖g‖² = aᵀK_Ua
        grad_sq_error = _gram_resolution(gram_u, dimension) * (a @ a)
    else:  # ‖g‖² = bᵀK_Vb with b = Ba
        b = coefficients @ a
        grad_sq_error = resolution * (b @ b)
    natural = None
    if coefficients is None:
        result = _woodbury(gram_u, gram_v, gram_uv, dimension, dampings, empirical, resolution)
        if result is None:
            joint = joint_basis_block_statistics(
                gram_u, gram_v, gram_uv, dimension, dampings, empirical=empirical
            )
            for statistics in joint.statistics.damped:
                statistics.grad_sq_error = grad_sq_error
            return joint
        damped, errors = result
    elif len(dampings) >= SPECTRAL_MIN_DAMPINGS:
        damped, errors = _coefficients_spectral(
            gram_v, gram_uv, coefficients, dimension, dampings, empirical, resolution
        )
    else:
        damped, errors, natural = _coefficients_cholesky(
            gram_v, gram_uv, coefficients, dimension, dampings, empirical, resolution
        )
    errors += [ef.relative_error for ef in empirical if ef.relative_error is not None]
    for statistics in damped:
        statistics.grad_sq_error = grad_sq_error
    return BlockStatistics(
        statistics=LayerStatistics(**undamped, damped=damped),
        health=NumericalHealth("gram", _worst(errors, gram_v)),
        empirical=list(empirical),
        natural=natural,
    )


def _coefficients_cholesky(gram_v, gram_uv, coefficients, dimension, dampings, empirical, tau):
    """Coefficient path, one Cholesky factorisation of ``λI + K_V`` per damping.

    With ``b = Ba`` (``g = Vb``), ``y₀ = L⁻¹b``, ``y₁ = L⁻¹K_Vb``, ``c₀ = L⁻ᵀy₀ = (λI + K_V)⁻¹b``
    and ``c = L⁻ᵀy₁ = (λI + K_V)⁻¹K_Vb``: ``gᵀA⁻¹g = y₀·y₁``, ``‖A⁻¹g‖² = c₀·c``,
    ``⟨A⁻¹g, B⁻¹g⟩ = c·(B e)`` and ``tr(UᵀA⁻¹U) = Σ (L⁻¹B) ⊙ (L⁻¹K_VB)``. Every product
    acts on ``K_V b`` or ``K_V B``, so components of ``b`` in the null space of ``K_V`` (which
    ``V`` ignores) are never divided by λ. All right-hand sides go through one triangular
    solve per damping. Returns the damped statistics, the error estimates and ``c₀`` per
    damping (``A⁻¹g = Vc₀``).
    """
    n, r = gram_uv.shape
    a = _mean_weights(n, gram_v)
    b = coefficients @ a
    k_b = gram_uv.mT @ a  # K_V B a = K_V b
    grad_sq = b @ k_b
    rhs = torch.cat([b.unsqueeze(1), k_b.unsqueeze(1), as_dense(coefficients), gram_uv.mT], dim=1)
    workspace = torch.empty_like(gram_v)
    damped, errors, natural = [], [], []
    for damping, ef in zip(dampings, empirical, strict=True):
        factor = factor_damped_gram(gram_v, damping, workspace)
        y = factor.half_solve(rhs)
        y0, y1 = y[:, 0], y[:, 1]
        c0_c = factor.back_solve(y[:, :2])
        c0, c = c0_c[:, 0], c0_c[:, 1]
        natural.append(c0)
        nat_projection = y0 @ y1
        nat_sq = c0 @ c
        nat_ef = c @ (coefficients @ ef.coefficients)
        trace_u = (y[:, 2 : 2 + n] * y[:, 2 + n :]).sum()
        trace_v = r - damping * factor.trace_inverse
        kl = 0.5 * (trace_u - trace_v + factor.logdet_ratio - ef.logdet_ratio)
        damped.append(_damped(damping, dimension, kl, grad_sq, nat_sq, nat_ef, nat_projection, ef))
        # an error τ on K_V moves ‖V c₀‖² by about τ‖c₀‖² and bᵀK_V c₀ by about λτ‖c₀‖²
        c0_sq = c0.square().sum()
        errors += [_relative(tau * c0_sq, nat_sq), _relative(tau * damping * c0_sq, nat_projection)]
    return damped, errors, natural


def _coefficients_spectral(gram_v, gram_uv, coefficients, dimension, dampings, empirical, tau):
    """Coefficient path from one eigendecomposition ``K_V = W diag(σ) Wᵀ`` for all dampings.

    With ``b̂ = Wᵀb``, ``B̂ = WᵀB`` and ``f = σ/(σ+λ)``: ``gᵀA⁻¹g = Σ f b̂²``,
    ``‖A⁻¹g‖² = Σ f b̂²/(σ+λ)``, ``⟨A⁻¹g, B⁻¹g⟩ = Σ f b̂ (B̂e)``,
    ``tr(UᵀA⁻¹U) = Σ_i f_i ‖B̂_i‖²``, ``tr(VᵀA⁻¹V) = Σ f``, ``log det(I + K_V/λ) = Σ log(1 + σ/λ)``.
    """
    n = gram_uv.shape[0]
    a = _mean_weights(n, gram_v)
    sigma, vectors = _eigh(gram_v)
    rotated = vectors.mT @ torch.cat([(coefficients @ a).unsqueeze(1), as_dense(coefficients)], 1)
    b_hat, coefficients_hat = rotated[:, 0], rotated[:, 1:]
    row_sq = coefficients_hat.square().sum(dim=1)
    grad_sq = (sigma * b_hat.square()).sum()
    damped, errors = [], []
    for damping, ef in zip(dampings, empirical, strict=True):
        shifted = sigma + damping
        f = sigma / shifted
        nat_projection = (f * b_hat.square()).sum()
        nat_sq = (f * b_hat.square() / shifted).sum()
        nat_ef = (f * b_hat * (coefficients_hat @ ef.coefficients)).sum()
        trace_u = (f * row_sq).sum()
        kl = 0.5 * (trace_u - f.sum() + torch.log1p(sigma / damping).sum() - ef.logdet_ratio)
        damped.append(_damped(damping, dimension, kl, grad_sq, nat_sq, nat_ef, nat_projection, ef))
        c_sq = (b_hat / shifted).square().sum()
        errors += [_relative(tau * c_sq, nat_sq), _relative(tau * damping * c_sq, nat_projection)]
    return damped, errors


#: The Woodbury formulas lose all digits of ``‖g − Vc‖²`` below this fraction of ``‖g‖²``
#: (a cancellation); from there on the joint basis takes over.
WOODBURY_CANCELLATION = 1e-8


def _woodbury(gram_u, gram_v, gram_uv, dimension, dampings, empirical, tau):
    """Woodbury path (no coefficients): ``A⁻¹g = (g − Vc)/λ``, ``c = (λI + K_V)⁻¹Vᵀg``.

    Returns ``None`` when ``g − Vc`` or ``gᵀg − wᵀc`` cancels (``g`` almost inside the
    range of ``V`` at a damping small against ``K_V``).
    """
    n, r = gram_uv.shape
    a = _mean_weights(n, gram_u)
    grad_sq = a @ (gram_u @ a)
    w = gram_uv.mT @ a  # Vᵀg
    trace_ef = torch.diagonal(gram_u).sum()
    workspace = torch.empty_like(gram_v)
    damped, errors = [], []
    for damping, ef in zip(dampings, empirical, strict=True):
        factor = factor_damped_gram(gram_v, damping, workspace)
        c = factor.solve(w)  # (λI + K_V)⁻¹Vᵀg
        w_c = w @ c
        residual_sq = grad_sq - 2.0 * w_c + c @ (gram_v @ c)  # ‖g − Vc‖² = λ²‖A⁻¹g‖²
        cancellation = WOODBURY_CANCELLATION * grad_sq
        if bool(residual_sq <= cancellation) or bool(grad_sq - w_c <= cancellation):
            return None
        nat_projection = (grad_sq - w_c) / damping
        nat_sq = residual_sq / damping**2
        nat_ef = (a @ (gram_u @ ef.coefficients) - ef.coefficients @ (gram_uv @ c)) / damping
        projected = factor.half_solve(gram_uv.mT)
        trace_u = (trace_ef - torch.linalg.vector_norm(projected) ** 2) / damping
        trace_v = r - damping * factor.trace_inverse
        kl = 0.5 * (trace_u - trace_v + factor.logdet_ratio - ef.logdet_ratio)
        damped.append(_damped(damping, dimension, kl, grad_sq, nat_sq, nat_ef, nat_projection, ef))
        # ‖g − Vc‖² is a quadratic form in [g, V] with coefficients [1, −c]: an error τ on
        # the joint Gram moves it by about τ(1 + ‖c‖²); gᵀg − wᵀc by about τ(1 + ‖c‖)²
        c_sq = c.square().sum()
        scale = torch.maximum(tau, _gram_resolution(gram_u, dimension))
        errors += [
            _relative(scale * (1.0 + c_sq), residual_sq),
            _relative(scale * (1.0 + c_sq.sqrt()) ** 2, grad_sq - w_c),
        ]
    return damped, errors


def lowrank_statistics(
    gram_u: Tensor,
    gram_v: Tensor,
    gram_uv: Tensor,
    dimension: int,
    dampings: Sequence[float],
    coefficients: Tensor | None = None,
    *,
    empirical: Sequence[EmpiricalSolve] | None = None,
) -> LayerStatistics:
    """Additive statistics of ``F = VVᵀ`` against ``EF = UUᵀ`` from Gram matrices.

    See the module docstring for the identities used. Two routes avoid the cancellation
    that ``A⁻¹g = (1/λ)(g − V(λI + K_V)⁻¹Vᵀg)`` suffers when ``g`` lies (almost) in the range
    of ``V`` and λ is small against ``K_V`` — the usual case for the exact Fisher:

    - with ``coefficients`` ``B`` (``R × N``, ``U = VB``), the push-through identity
      ``A⁻¹V = V(λI + K_V)⁻¹`` gives ``A⁻¹g = V(λI + K_V)⁻¹Ba`` and
      ``tr(UᵀA⁻¹U) = tr(Bᵀ(λI + K_V)⁻¹K_V B)``, with no division by λ; with
      :data:`SPECTRAL_MIN_DAMPINGS` or more dampings one eigendecomposition of ``K_V``
      serves them all;
    - otherwise the Woodbury formulas are used, and where they would cancel the
      statistics are computed in an orthonormal basis of the joint range of ``U`` and
      ``V`` (:func:`joint_basis_statistics`).

    :func:`gram_block_statistics` returns the same statistics with a rounding estimate.

    Args:
        gram_u: ``K_U = UᵀU`` (``N × N``), with ``U = [g_1 … g_N]/√N``.
        gram_v: ``K_V = VᵀV`` (``R × R``).
        gram_uv: ``K_UV = UᵀV`` (``N × R``).
        dimension: Number of parameters ``D`` of the block.
        dampings: Damping values λ (> 0).
        coefficients: Optional ``B`` with ``U = VB``. When given, ``gram_u`` and
            ``gram_uv`` must equal ``BᵀK_VB`` and ``BᵀK_V``.
        empirical: Optional precomputed EF-side solves (:func:`empirical_solves`), one
            per damping.

    Returns:
        The block's additive statistics.
    """
    return gram_block_statistics(
        gram_u, gram_v, gram_uv, dimension, dampings, coefficients, empirical=empirical
    ).statistics


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
    as in :class:`~fisher_monitor.curvature.factors.OuterProductFactors`). With a Householder
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
        empirical = _spectral_empirical(
            spectra.mu, spectra.wt_u.mT, spectra.a, dampings, torch.zeros_like(spectra.mu)
        )
    else:
        route = "joint"
        empirical = _spectral_empirical(
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
    undamped = _undamped(
        dimension,
        alpha.sum(),
        mu.sum(),
        alpha.square().sum(),
        mu.square().sum(),
        (alpha * spectra.row_sq).sum(),
    )
    return BlockStatistics(
        statistics=LayerStatistics(**undamped, damped=damped),
        health=NumericalHealth(route, _worst(errors, v_root)),
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
    a = _mean_weights(n, v_root)
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
    statistics = _damped(
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
        _relative(sq_error, nat_sq),
        _relative(projection_error, nat_projection),
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
        [_relative(nat_vector, nat_sq.sqrt()), _relative(nat_projection_error, nat_projection)],
        [
            _relative(ef_vector, ef.ef_sq.sqrt()),
            _relative(ef_projection_error, ef.ef_projection),
            _relative(per_sample_error, ef.per_sample),
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
        _gram_resolution(joint, dimension), eigenvalues.max() * joint.shape[0] * eps
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
