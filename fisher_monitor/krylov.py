"""Krylov methods on a symmetric positive semi-definite operator given only by its products.

For ``A = F + σI`` with ``F`` positive semi-definite, known only through products ``F V``
(``V``: several vectors at once), this module solves ``A x = b`` and evaluates quadratic
forms ``bᵀ φ(F) b`` for every shift ``σ`` of a list, from **one** Krylov run per right-hand
side. Pure tensor arithmetic: nothing here knows about networks.

**Multi-shift conjugate gradients.** Krylov spaces do not depend on the shift:
``K_m(F + σI, b) = K_m(F, b)``. Conjugate gradients on the *seed* system ``F + σ₀I`` (the
smallest shift, the slowest to converge) produce residuals to which the residuals of every
other shifted system are collinear, ``r_k^σ = ζ_k^σ r_k`` (Jegerlehner, 1996; Frommer,
2003), so each further shift costs vector updates only, no products:

    ζ_{k+1} = ζ_k ζ_{k−1} α_{k−1} / [α_k β_{k−1} (ζ_{k−1} − ζ_k) + ζ_{k−1} α_{k−1} (1 + δ α_k)]
    α_k^σ = α_k ζ_{k+1}/ζ_k,   β_k^σ = (ζ_{k+1}/ζ_k)² β_k,   δ = σ − σ₀ ≥ 0

(``ζ_0 = ζ_{−1} = 1``, ``α_{−1} = 1``). Solution vectors are kept only for the first
``keep`` right-hand sides; the others only feed quadratures.

**Gauss quadrature.** The seed's coefficients ``α_k``, ``β_k`` are those of the Lanczos
process on ``F + σ₀I`` started at ``b/‖b‖``; its tridiagonal matrix ``T_m`` (diagonal
``1/α_k + β_{k−1}/α_{k−1}``, off-diagonal ``√β_k/α_k``) shifted back by ``σ₀`` gives the
``m``-point Gauss quadrature rule of the spectral measure of ``F`` seen from ``b``
(Golub & Meurant, 2010):

    bᵀ φ(F) b  ≈  ‖b‖² Σ_i φ(θ_i) y_{1i}²,     T_m − σ₀I = Y diag(θ) Yᵀ

exact for polynomials of degree ``2m − 1``. For ``φ(t) = 1/(t + σ)`` it is ``bᵀx_m^σ``,
the conjugate-gradient iterate's own value, an underestimate by
``r_mᵀ(F + σI)⁻¹r_m ≤ ‖r_m^σ‖²/σ``. Stochastic Lanczos quadrature (Ubaru, Chen & Saad,
2017) applies this to Rademacher vectors ``z`` (``E[zᵀXz] = tr X``).

**Stopping.** Each right-hand side has a tolerance and one of three rules, met at every
shift; stopped right-hand sides leave the batch, so later products cost less.

- :data:`RESIDUAL`: ``‖r^σ‖ ≤ tol ‖b‖``. The solution's error is then at most
  ``‖r^σ‖/σ`` (:func:`true_residuals` recomputes the residual to check it).
- :data:`ENERGY`: ``‖r^σ‖²/σ ≤ tol · bᵀx^σ``. The Gauss quadrature of ``1/(t + σ)``,
  ``bᵀx^σ``, underestimates ``bᵀ(F + σI)⁻¹b`` by ``r^σᵀ(F + σI)⁻¹r^σ ≤ ‖r^σ‖²/σ``: a
  relative error of at most ``tol``.
- :data:`TRACE`: ``‖r^σ‖² ≤ tol · (‖b‖² − σ bᵀx^σ)``: the same bound, relative to
  ``bᵀF(F + σI)⁻¹b`` (for probes of ``tr(F(F + σI)⁻¹)`` and the log-determinant, whose
  Gauss quadrature converges faster than that of ``1/(t + σ)``).

``bᵀx^σ`` follows from scalar recurrences (``bᵀx^σ += α^σ bᵀp^σ``,
``bᵀp^σ ← ζ^σ bᵀr + β^σ bᵀp^σ``), so no solution vector is needed for the rules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: ``apply(V)``: the products ``F V`` for a batch ``V`` of shape ``(m, D)``.
Operator = Callable[[Tensor], Tensor]
#: Stopping rules (module docstring).
RESIDUAL, ENERGY, TRACE = 0, 1, 2


@dataclass
class KrylovResult:
    """The outcome of :func:`shifted_conjugate_gradients`.

    Attributes:
        shifts: ``σ_s``, ``(S,)``.
        solutions: ``x^σ ≈ (F + σI)⁻¹ b`` for the kept right-hand sides, ``(keep, S, D)``.
        diagonals: Per right-hand side, the diagonal of its Lanczos matrix of ``F``
            (``(m_j,)``; ``m_j`` its iterations).
        off_diagonals: Per right-hand side, the off-diagonal (``(m_j − 1,)``).
        norms: ``‖b_j‖``, ``(m,)``.
        residuals: ``‖r^σ‖`` (as the recursion has it) at the last iteration, ``(m, S)``.
        energies: ``bᵀx^σ`` (the Gauss quadrature of ``1/(t + σ)``), ``(m, S)``.
        iterations: Products each right-hand side took part in, ``(m,)``.
        converged: Whether each right-hand side met its tolerance, ``(m,)``.
        products: Vectors multiplied by ``F`` in all (the work).
    """

    shifts: Tensor
    solutions: Tensor
    diagonals: list[Tensor]
    off_diagonals: list[Tensor]
    norms: Tensor
    residuals: Tensor
    energies: Tensor
    iterations: Tensor
    converged: Tensor
    products: int

    def quadrature(self, lane: int, functions: Sequence[Callable[[Tensor], Tensor]]) -> Tensor:
        """``b_jᵀ φ(F) b_j`` for each function (of the eigenvalues ``θ ≥ 0``): ``(len,)``.

        Gauss quadrature from the right-hand side's Lanczos matrix; 0 for ``b_j = 0``.
        """
        nodes, weights = gauss_rule(self.diagonals[lane], self.off_diagonals[lane])
        norm_sq = self.norms[lane] ** 2
        return torch.stack([norm_sq * (weights * phi(nodes)).sum() for phi in functions])


def gauss_rule(diagonal: Tensor, off_diagonal: Tensor) -> tuple[Tensor, Tensor]:
    """Nodes and weights of the Gauss rule of a Lanczos matrix (nodes clipped at zero).

    ``F`` is positive semi-definite, so negative nodes are rounding. Weights sum to one.
    """
    if diagonal.numel() == 0:
        empty = diagonal.new_zeros(1)
        return empty, empty
    matrix = torch.diag(diagonal)
    if off_diagonal.numel():
        matrix = matrix + torch.diag(off_diagonal, 1) + torch.diag(off_diagonal, -1)
    nodes, vectors = torch.linalg.eigh(matrix)
    return nodes.clamp_min(0.0), vectors[0].square()


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``a_i · b_i`` per row: one batched product (several times faster than ``vecdot``)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(a.shape[0])


class _Lanes:
    """The state of every right-hand side during the iteration (see the module docstring)."""

    def __init__(self, starts: Tensor, shifts: Tensor, keep: int):
        m, d = starts.shape
        dtype, device = starts.dtype, starts.device
        self.shifts, self.offsets = shifts, shifts - shifts.min()
        # r, p and the starts of the active lanes only (compacted as lanes leave the batch)
        self.r = starts.clone()
        self.p = starts.clone()
        self.active_starts = starts
        self.rho = self.r.square().sum(dim=1)
        self.norms = self.rho.sqrt()
        count = shifts.shape[0]
        self.x = torch.zeros(keep, count, d, dtype=dtype, device=device)
        self.p_shift = starts[:keep].unsqueeze(1).repeat(1, count, 1)
        self.bp = self.rho.unsqueeze(1).repeat(1, count)  # bᵀp^σ
        self.bx = torch.zeros_like(self.bp)  # bᵀx^σ
        self.zeta = torch.ones(m, count, dtype=dtype, device=device)
        self.zeta_old = torch.ones_like(self.zeta)
        self.alpha_old = torch.ones(m, dtype=dtype, device=device)
        self.beta_old = torch.zeros(m, dtype=dtype, device=device)
        # per iteration, every lane's α and β (NaN once a lane has left the batch)
        self.alphas: list[Tensor] = []
        self.betas: list[Tensor] = []
        self.keep = keep

    def step(self, lanes: Tensor, product: Tensor) -> None:
        """One conjugate-gradient step of the active lanes ``lanes`` given ``F p`` for them.

        ``product`` is overwritten (it becomes ``(F + σ₀I) p``); the vector updates are in
        place on the active lanes' rows (:meth:`compact`), one pass over memory each.
        """
        seed = self.shifts.min()
        p, r, rho = self.p, self.r, self.rho[lanes]
        if product.data_ptr() == p.data_ptr():  # an operator that returned its input
            product = product.clone()
        shifted = product.add_(p, alpha=float(seed))
        alpha = rho / _rowdot(p, shifted)
        r.addcmul_(alpha.unsqueeze(1), shifted, value=-1.0)
        rho_new = _rowdot(r, r)
        beta = rho_new / rho
        self._shift_step(lanes, alpha, beta, r)
        self.rho[lanes] = rho_new
        p.mul_(beta.unsqueeze(1)).add_(r)
        for history, values in ((self.alphas, alpha), (self.betas, beta)):
            row = torch.full_like(self.rho, float("nan"))
            row[lanes] = values
            history.append(row)

    def retire(self, active: Tensor, tolerances: Tensor, rules: Tensor) -> Tensor:
        """The lanes of ``active`` that go on; the rows of those that stopped are dropped."""
        still = ~self.done(tolerances, rules)[active]
        if not bool(still.all()):
            self.r, self.p = self.r[still], self.p[still]
            self.active_starts = self.active_starts[still]
        return active[still]

    def _shift_step(self, lanes: Tensor, alpha: Tensor, beta: Tensor, r: Tensor) -> None:
        zeta, zeta_old = self.zeta[lanes], self.zeta_old[lanes]
        alpha_old, beta_old = self.alpha_old[lanes].unsqueeze(1), self.beta_old[lanes].unsqueeze(1)
        a = alpha.unsqueeze(1)
        denominator = a * beta_old * (zeta_old - zeta) + zeta_old * alpha_old * (
            1.0 + self.offsets * a
        )
        zeta_new = zeta * zeta_old * alpha_old / denominator
        # a shift whose residual underflowed has converged: it stays at zero
        zeta_new = torch.where(zeta == 0, torch.zeros_like(zeta_new), zeta_new)
        ratio = torch.where(zeta == 0, torch.zeros_like(zeta), zeta_new / zeta)
        alpha_shift, beta_shift = a * ratio, ratio.square() * beta.unsqueeze(1)
        bp = self.bp[lanes]
        self.bx[lanes] += alpha_shift * bp
        br = _rowdot(self.active_starts, r).unsqueeze(1)
        self.bp[lanes] = zeta_new * br + beta_shift * bp
        kept = lanes < self.keep
        if bool(kept.any()):
            index = lanes[kept]
            self.x[index] += alpha_shift[kept].unsqueeze(2) * self.p_shift[index]
            self.p_shift[index] = (
                zeta_new[kept].unsqueeze(2) * r[kept].unsqueeze(1)
                + beta_shift[kept].unsqueeze(2) * self.p_shift[index]
            )
        self.zeta_old[lanes], self.zeta[lanes] = zeta, zeta_new
        self.alpha_old[lanes], self.beta_old[lanes] = alpha, beta

    def residuals(self) -> Tensor:
        """``‖r^σ‖ = |ζ^σ| ‖r‖``, ``(m, S)``."""
        return self.zeta.abs() * self.rho.sqrt().unsqueeze(1)

    def done(self, tolerances: Tensor, rules: Tensor) -> Tensor:
        """Which lanes meet their stopping rule at every shift (module docstring)."""
        residuals = self.residuals()
        tolerance = tolerances.unsqueeze(1)
        squares = residuals.square()
        norm_sq = self.norms.square().unsqueeze(1)
        met = torch.where(
            (rules == RESIDUAL).unsqueeze(1),
            residuals <= tolerance * self.norms.unsqueeze(1),
            torch.where(
                (rules == ENERGY).unsqueeze(1),
                squares <= tolerance * self.shifts * self.bx,
                squares <= tolerance * (norm_sq - self.shifts * self.bx).clamp_min(0.0),
            ),
        )
        # a lane whose residual vanished exactly (b = 0, or an invariant subspace) is done
        return met.all(dim=1) | (self.rho == 0)

    def tridiagonals(self, iterations: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every lane's Lanczos matrix of ``F``: diagonal and off-diagonal (on the CPU)."""
        if not self.alphas:
            empty = torch.zeros(0, dtype=self.r.dtype)
            return [(empty, empty) for _ in range(self.rho.shape[0])]
        alphas = torch.stack(self.alphas).cpu()
        betas = torch.stack(self.betas).cpu()
        return [
            self._tridiagonal(alphas[:count, lane], betas[:count, lane])
            for lane, count in enumerate(iterations.tolist())
        ]

    def _tridiagonal(self, alphas: Tensor, betas: Tensor) -> tuple[Tensor, Tensor]:
        if alphas.numel() == 0:
            return alphas, alphas
        diagonal = 1.0 / alphas
        diagonal[1:] += betas[:-1] / alphas[:-1]
        off_diagonal = betas[:-1].sqrt() / alphas[:-1]
        return diagonal - float(self.shifts.min()), off_diagonal


def shifted_conjugate_gradients(
    apply: Operator,
    starts: Tensor,
    shifts: Sequence[float] | Tensor,
    keep: int = 1,
    tolerances: Sequence[float] | Tensor | float = 1e-6,
    max_iterations: int = 1000,
    rules: Sequence[int] | Tensor | int = RESIDUAL,
) -> KrylovResult:
    """Solve ``(F + σI) x = b`` for every shift and right-hand side, by one Krylov run each.

    Args:
        apply: ``F V`` for a batch ``V`` (``(m, D)``), e.g. exact Fisher-vector products.
        starts: Right-hand sides ``b_j``, ``(m, D)``; the first ``keep`` get solution vectors.
        shifts: ``σ_s > 0``.
        keep: How many leading right-hand sides keep their solution vectors.
        tolerances: Tolerance of each right-hand side's stopping rule (one value for all,
            or one per right-hand side).
        max_iterations: Products per right-hand side at most.
        rules: Stopping rule of each right-hand side (:data:`RESIDUAL`, :data:`ENERGY` or
            :data:`TRACE`; one for all, or one per right-hand side).

    Returns:
        The solutions, Lanczos matrices and convergence record.

    Raises:
        ValueError: For a shift that is not positive.
    """
    shifts = torch.as_tensor(shifts, dtype=starts.dtype, device=starts.device).reshape(-1)
    if not bool((shifts > 0).all()):
        raise ValueError(f"Every shift must be positive, got {shifts.tolist()!r}.")
    tolerances = torch.as_tensor(tolerances, dtype=starts.dtype, device=starts.device)
    tolerances = tolerances.expand(starts.shape[0])
    rules = torch.as_tensor(rules, device=starts.device).expand(starts.shape[0])
    lanes = _Lanes(starts, shifts, keep)
    active = torch.arange(starts.shape[0], device=starts.device)
    iterations = torch.zeros(starts.shape[0], dtype=torch.long)
    products = 0
    active = lanes.retire(active, tolerances, rules)
    for _ in range(max_iterations):
        if active.numel() == 0:
            break
        product = apply(lanes.p)
        products += active.numel()
        iterations[active.cpu()] += 1
        lanes.step(active, product)
        active = lanes.retire(active, tolerances, rules)
    converged = lanes.done(tolerances, rules)
    tridiagonals = lanes.tridiagonals(iterations)
    return KrylovResult(
        shifts=shifts,
        solutions=lanes.x,
        diagonals=[t[0] for t in tridiagonals],
        off_diagonals=[t[1] for t in tridiagonals],
        norms=lanes.norms,
        residuals=lanes.residuals(),
        energies=lanes.bx,
        iterations=iterations,
        converged=converged,
        products=products,
    )


def true_residuals(apply: Operator, result: KrylovResult, starts: Tensor) -> Tensor:
    """``‖b − (F + σI) x^σ‖`` of the kept solutions, recomputed with ``keep·S`` products.

    The recursion's residual drifts from the true one by rounding (about ``ε κ``); this is
    the check that the stated tolerance holds. Returns ``(keep, S)``.
    """
    keep, count, d = result.solutions.shape
    if keep == 0:
        return result.solutions.new_zeros(0, count)
    flat = result.solutions.reshape(keep * count, d)
    product = apply(flat).reshape(keep, count, d)
    shifted = product + result.shifts.view(1, count, 1) * result.solutions
    return (starts[:keep].unsqueeze(1) - shifted).norm(dim=2)


def rademacher(count: int, size: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """``(count, size)`` independent ±1 entries from ``generator``, ``like``'s type and device."""
    bits = torch.randint(0, 2, (count, size), generator=generator, device=generator.device)
    return bits.to(device=like.device, dtype=like.dtype).mul_(2.0).sub_(1.0)


__all__ = [
    "ENERGY",
    "RESIDUAL",
    "TRACE",
    "KrylovResult",
    "Operator",
    "gauss_rule",
    "rademacher",
    "shifted_conjugate_gradients",
    "true_residuals",
]
