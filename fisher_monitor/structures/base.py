"""The structure contract: turn one layer's factors into additive statistics.

A structure (``diag``, ``block``, ``kron``, …) restricts F and EF to a set of entries and
reduces a layer to :class:`~fisher_monitor.metrics.LayerStatistics`, which add up over
layers and are finalised into metrics by the engine. A structure lives in its own folder
(``structures/<name>/``: the :class:`Structure` subclass, its statistics and routes, its
sketched estimator) and answers its own questions:

- :meth:`Structure.layer`: the statistics of one layer (and, on request, the damped
  directions ``A⁻¹g`` and ``B⁻¹g``);
- :meth:`Structure.flops` and :meth:`Structure.peak_bytes`: its work and memory on a
  layer of a given :class:`~fisher_monitor.factors.LayerShape` in a pass of a given
  :class:`~fisher_monitor.factors.PassSize`, which the cost and memory models add up;
- :attr:`Structure.sketch_unavailable`: whether it can be estimated from a sketched pass,
  and which metrics it then cannot give.

Adding a structure is adding its folder and registering the class
(:func:`fisher_monitor.structures.register`, one line in
:data:`fisher_monitor.structures.STRUCTURES` for the built-in ones).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from fisher_monitor.estimators import Replicates, SketchDesign
from fisher_monitor.factors import LayerFactors, LayerShape, PassSize
from fisher_monitor.layers import LayerInfo
from fisher_monitor.linalg import eigen_solve
from fisher_monitor.metrics import LayerStatistics
from fisher_monitor.structures.empirical import EmpiricalSolve, empirical_solves

#: Per damping value: ``(A⁻¹g, B⁻¹g)`` of one layer in ``named_parameters`` order.
Directions = list[tuple[Tensor, Tensor]]


class StructureUnavailable(Exception):
    """A structure has no form for this layer (e.g. no Kronecker factors for BatchNorm)."""


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
        statistics: The additive statistics (of the full estimate, when estimated).
        directions: ``(A⁻¹g, B⁻¹g)`` per damping when asked for, else ``None``.
        health: How far rounding may have moved the damped statistics (a relative error
            estimate, :class:`NumericalHealth`), where the structure knows it.
        replicates: When the layer was measured from a sketched pass, the replicate
            statistics its standard errors come from
            (:mod:`~fisher_monitor.estimators.jackknife`); else ``None``.
    """

    statistics: LayerStatistics
    directions: Directions | None = None
    health: NumericalHealth | None = None
    replicates: Replicates | None = None


class Structure(ABC):
    """One restriction of F and EF (see the module docstring).

    Args:
        sketch: The sketch of the pass when the Fisher's factor is estimated (only for
            structures with an estimator, :attr:`sketch_unavailable` not ``None``).

    Raises:
        ValueError: For a sketch given to a structure without an estimator.
    """

    #: Name in keys and settings.
    name: ClassVar[str]
    #: Metrics (without damping suffix) a sketched pass cannot give for this structure;
    #: ``None`` when the structure has no estimator at all (it is left out of sketched
    #: measurements, with a note).
    sketch_unavailable: ClassVar[frozenset[str] | None] = None

    def __init__(self, sketch: SketchDesign | None = None) -> None:
        if sketch is not None and self.sketch_unavailable is None:
            raise ValueError(f"The {self.name!r} structure has no estimator for a sketch.")
        self.sketch = sketch

    @property
    def needs_factors(self) -> bool:
        """Whether the structure needs the layer's factors (``False``: diagonals suffice)."""
        return True

    @abstractmethod
    def layer(self, layer: LayerInput, directions: bool = False) -> LayerResult:
        """Statistics (and optionally directions) of one layer.

        Raises:
            StructureUnavailable: If the structure has no form for this layer.
        """

    @abstractmethod
    def flops(self, shape: LayerShape, size: PassSize) -> float:
        """Floating-point work of :meth:`layer` on a layer of this shape.

        The factors' own work (diagonals, mean gradient) is the representation's
        (:meth:`~fisher_monitor.factors.LayerFactors.pass_flops`), counted once per layer.
        """

    @abstractmethod
    def peak_bytes(self, shape: LayerShape, size: PassSize) -> int:
        """Bytes :meth:`layer` holds at its peak on a layer of this shape, factors excluded."""


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
    "NumericalHealth",
    "Structure",
    "StructureUnavailable",
    "dense_directions",
]
