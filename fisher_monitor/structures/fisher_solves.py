"""Exact-Fisher solves after the pass: how a structure asks the engine for ``(F_b + λI)⁻¹``.

Under a sketched pass (``docs/theory.md#estimators``) a structure has exact EF-side factors
but only a low-rank estimate ``F̂_b`` of the Fisher block, and ``(F̂_b + λI)⁻¹`` is badly
biased. The exact ``(F_b + λI)⁻¹`` is reachable without the Fisher's factor, from
matrix-free products ``F_b v = (1/N) Σ_n J_{b,n}ᵀ H_n J_{b,n} v`` — but those need the
network, the probe inputs and the loss, which only the engine holds, and they can only run
once the backend's pass is over. So the protocol is:

1. a structure that can use them derives from :class:`ExactSolves`; the cost model sets
   :attr:`ExactSolves.exact_solves` when it budgets the work;
2. during the pass, its :meth:`~fisher_monitor.structures.base.Structure.layer` returns a
   :class:`DeferredResult`: the layer's statistics so far, a :class:`SolveRequest` (the
   right-hand sides and dampings) and a function that finishes the result;
3. after the pass, the engine (:mod:`fisher_monitor.engine.exact_solves`) runs the Krylov
   solves (:mod:`fisher_monitor.krylov`) and calls :meth:`DeferredResult.complete` with
   the :class:`LayerSolutions`, which returns the finished
   :class:`~fisher_monitor.structures.base.LayerResult` (a :class:`SolvedResult`, whose
   ``kl_variance`` carries the probes' share of the KL's standard error).

A deferred result the engine does not complete (the solves were over budget, or failed)
stays a valid result: its Fisher-inverse metrics are simply unavailable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from fisher_monitor.layers import LayerInfo
from fisher_monitor.structures.base import LayerResult


class ExactSolves:
    """Mixin of a structure that finishes sketched layers with exact-Fisher solves.

    Attributes:
        exact_solves: Whether this measurement runs them (set by the cost model; without
            it the structure returns plain results and the metrics below are left out).
    """

    #: Metrics (without damping suffix) the solves restore under a sketch.
    solved_metrics: ClassVar[frozenset[str]] = frozenset()
    exact_solves: bool = False


@dataclass
class SolveRequest:
    """What a layer needs from its exact Fisher block.

    Attributes:
        info: The layer.
        gradient: ``g_b``, float64, ``named_parameters`` order.
        per_sample: The per-sample gradients ``g_n`` as rows, ``(N, D)``, float64.
        shifts: The distinct dampings ``λ`` to solve for (every replicate's and damping
            value's).
    """

    info: LayerInfo
    gradient: Tensor
    per_sample: Tensor
    shifts: list[float]


@dataclass
class ShiftSolution:
    """The exact-Fisher quantities of one layer at one damping ``λ`` (``A = F_b + λI``).

    Attributes:
        direction: ``A⁻¹g`` (conjugate gradients), or ``None`` if it did not converge.
        projection: ``gᵀA⁻¹g``.
        error_bound: ``‖r‖/(λ‖x‖)`` from the recomputed residual ``r = g − Ax``: a bound on
            the relative error of ``direction``.
        spectral: Per probe ``z_j``, ``z_jᵀ h(F_b) z_j`` with
            ``h(σ) = log(1 + σ/λ) − σ/(σ + λ)`` (stochastic Lanczos quadrature), so that
            ``E = log det(I + F_b/λ) − tr(F_b A⁻¹)``; ``None`` if not converged.
        spectral_square: Per probe, ``z_jᵀ h(F_b)² z_j`` (``E = ‖h(F_b)‖²_F``, which bounds the
            probes' variance).
        empirical: ``tr(EF_b A⁻¹) = (1/N) Σ_n g_nᵀA⁻¹g_n``: one exact value, or one
            Hutchinson estimate per probe (``empirical_exact`` says which).
        empirical_exact: Whether ``empirical`` is exact.
    """

    direction: Tensor | None
    projection: Tensor | None
    error_bound: float
    spectral: Tensor | None
    spectral_square: Tensor | None
    empirical: Tensor | None
    empirical_exact: bool = True

    def kl(self, logdet_empirical: Tensor) -> tuple[Tensor, Tensor] | None:
        """``kl = ½[tr(EF A⁻¹) + tr h(F) − log det(I + EF/λ)]`` and its probe variance.

        ``½[tr(BA⁻¹) − D + log det A − log det B]`` rewritten with ``B = EF + λI``:
        ``tr(BA⁻¹) − D = tr(EF A⁻¹) − tr(F A⁻¹)`` and
        ``log det A − log det B = log det(I + F/λ) − log det(I + EF/λ)``. The variance of a
        Rademacher quadratic form is ``2 Σ_{i≠j} h_ij² ≤ 2‖h‖²_F``, estimated from
        ``spectral_square`` (a stable, slightly conservative figure); a Hutchinson
        ``empirical`` adds its sample variance.

        Args:
            logdet_empirical: ``log det(I + EF_b/λ)`` (exact, from the EF side).

        Returns:
            ``(kl, variance)``, or ``None`` when the traces did not converge.
        """
        if self.spectral is None or self.empirical is None or self.spectral_square is None:
            return None
        probes = self.spectral.numel()
        value = 0.5 * (self.spectral.mean() + self.empirical.mean() - logdet_empirical)
        variance = 0.5 * self.spectral_square.mean().clamp_min(0.0) / probes
        if not self.empirical_exact and self.empirical.numel() > 1:
            variance = variance + 0.25 * self.empirical.var() / self.empirical.numel()
        return value, variance


@dataclass
class LayerSolutions:
    """Everything the exact-Fisher solves found for one layer.

    Attributes:
        shifts: One :class:`ShiftSolution` per damping in the request.
        directions_converged: Whether ``A⁻¹g`` met its tolerance at every damping.
        traces_converged: Whether every trace probe met its tolerance.
        iterations: Products the slowest right-hand side took.
        products: Fisher-vector products in all (the work).
    """

    shifts: dict[float, ShiftSolution]
    directions_converged: bool
    traces_converged: bool
    iterations: int
    products: int

    def at(self, damping: float) -> ShiftSolution:
        """The solution for one of the requested dampings."""
        return self.shifts[float(damping)]


@dataclass
class DeferredResult(LayerResult):
    """A sketched layer's result waiting for exact-Fisher solves (module docstring).

    Attributes:
        request: What to solve.
        finish: Builds the finished result from the solutions.
    """

    request: SolveRequest | None = None
    finish: Callable[[LayerSolutions], LayerResult] | None = None

    def complete(self, solutions: LayerSolutions) -> LayerResult:
        """The finished result."""
        if self.finish is None:
            raise ValueError("This deferred result has no way to finish.")
        return self.finish(solutions)


@dataclass
class SolvedResult(LayerResult):
    """A result finished by exact-Fisher solves.

    Attributes:
        kl_variance: Per damping value, the variance of the KL divergence from its trace
            probes (added to the jackknife's, which covers the damping's own noise); ``None``
            where the KL is unavailable.
        solutions: The solve record (iterations, products, error bounds).
    """

    kl_variance: list[Tensor | None] = field(default_factory=list)
    solutions: LayerSolutions | None = None


__all__ = [
    "DeferredResult",
    "ExactSolves",
    "LayerSolutions",
    "ShiftSolution",
    "SolveRequest",
    "SolvedResult",
]
