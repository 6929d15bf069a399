"""The structure contract: turn one layer's factors into additive statistics.

A structure (``diag``, ``block``, ``kron``) restricts F and EF to a set of entries and
reduces a layer to :class:`~fisher_monitor.metrics.LayerStatistics`, which add up over
layers and are finalised into metrics by the engine. Adding a structure is adding a
module with a :class:`Structure` subclass, registering it in
:data:`fisher_monitor.structures.STRUCTURES`, and naming it in
:data:`fisher_monitor.keys.STRUCTURES` (the key format).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from fisher_monitor.curvature.factors import LayerFactors
from fisher_monitor.curvature.layers import LayerInfo
from fisher_monitor.metrics import LayerStatistics
from fisher_monitor.metrics.lowrank import EmpiricalSolve, NumericalHealth, empirical_solves

#: Per damping value: ``(A⁻¹g, B⁻¹g)`` of one layer in ``named_parameters`` order.
Directions = list[tuple[Tensor, Tensor]]


class StructureUnavailable(Exception):
    """A structure has no form for this layer (e.g. no Kronecker factors for BatchNorm)."""


@dataclass
class LayerInput:
    """Everything the structures may use about one layer, with shared work cached.

    Attributes:
        info: The layer.
        fisher_diag: ``diag F_b`` (float64, ``named_parameters`` order).
        empirical_diag: ``diag EF_b``.
        gradient: The mean gradient ``g_b``.
        factors: The layer's factors (``None`` when only diagonals are known, e.g. after
            a data-parallel reduction).
        dampings: This layer's ``λ_b`` per damping value.
    """

    info: LayerInfo
    fisher_diag: Tensor
    empirical_diag: Tensor
    gradient: Tensor
    factors: LayerFactors | None
    dampings: list[float]
    _cache: dict = field(default_factory=dict)

    def cached(self, key: str, compute):
        """``compute()`` once per layer and key (shared by the structures)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def require_factors(self) -> LayerFactors:
        """The factors; raises :class:`StructureUnavailable` without them."""
        if self.factors is None:
            raise StructureUnavailable("only the diagonals are known")
        return self.factors

    def dense_blocks(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(F_b, EF_b, g_b)`` dense (small layers only)."""
        return self.cached("dense", lambda: self.require_factors().dense_blocks())

    def gram_u(self) -> Tensor:
        """``K_U = UᵀU`` (``N × N``)."""
        return self.cached("gram_u", lambda: self.require_factors().gram_u())

    def empirical_solves(self) -> list[EmpiricalSolve]:
        """The EF-side solves ``(λI + K_U)⁻¹`` per damping, shared by block and kron."""
        return self.cached(
            "empirical",
            lambda: empirical_solves(self.gram_u(), self.dampings, self.info.dimension),
        )


@dataclass
class LayerResult:
    """A structure's result for one layer.

    Attributes:
        statistics: The additive statistics.
        directions: ``(A⁻¹g, B⁻¹g)`` per damping when asked for, else ``None``.
        health: How far rounding may have moved the damped statistics (a relative error
            estimate; see :class:`~fisher_monitor.metrics.lowrank.NumericalHealth`), where
            the structure knows it.
    """

    statistics: LayerStatistics
    directions: Directions | None = None
    health: NumericalHealth | None = None


class Structure(ABC):
    """One restriction of F and EF (see the module docstring)."""

    #: Name in keys and settings.
    name: ClassVar[str]
    #: Whether the structure needs the layer's factors (``False``: diagonals suffice).
    needs_factors: ClassVar[bool] = True

    @abstractmethod
    def layer(self, layer: LayerInput, directions: bool = False) -> LayerResult:
        """Statistics (and optionally directions) of one layer.

        Raises:
            StructureUnavailable: If the structure has no form for this layer.
        """


def eigen_solve(gram: Tensor, rhs: Tensor, damping: float) -> Tensor:
    """``(λI + K)⁻¹ rhs`` through the eigendecomposition of a PSD Gram matrix ``K``."""
    return damped_solver(gram, [damping])(0, rhs)


def damped_solver(gram: Tensor, dampings: Sequence[float]):
    """``solve(i, rhs) = (λ_i I + K)⁻¹ rhs`` for a PSD Gram ``K``, factorised once.

    One eigendecomposition serves several dampings; a single damping takes a Cholesky
    factorisation (several times cheaper), with the eigendecomposition as the fallback
    when rounding makes ``λI + K`` numerically indefinite.
    """
    if len(dampings) == 1:
        shifted = gram.clone()
        shifted.diagonal().add_(dampings[0])
        factor, info = torch.linalg.cholesky_ex(shifted)
        if int(info) == 0:
            return lambda index, rhs: torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)
    eigenvalues, vectors = torch.linalg.eigh(0.5 * (gram + gram.T))
    eigenvalues = eigenvalues.clamp_min(0.0)

    def solve(index: int, rhs: Tensor) -> Tensor:
        return vectors @ ((vectors.T @ rhs) / (eigenvalues + dampings[index]))

    return solve


def dense_directions(
    fisher: Tensor, empirical: Tensor, gradient: Tensor, dampings: Sequence[float]
) -> Directions:
    """``(A⁻¹g, B⁻¹g)`` per damping from dense blocks."""
    return [
        (eigen_solve(fisher, gradient, d), eigen_solve(empirical, gradient, d)) for d in dampings
    ]


__all__ = [
    "Directions",
    "LayerInput",
    "LayerResult",
    "Structure",
    "StructureUnavailable",
    "damped_solver",
    "dense_directions",
    "eigen_solve",
]
