"""``diag``: the diagonals of F and EF (see the theory page, ``docs/theory.md``).

The exact structure runs after the pass on the collected (and, under data parallelism,
reduced) diagonals. When the cost model (:mod:`fisher_monitor.engine.cost`) replaces the
exact factor by a sketch, the structure runs during the pass instead, where the sketched
columns can still be split into their replicate groups for the standard errors
(:func:`~fisher_monitor.estimators.diagonal.sketched_diagonal_replicates`,
``docs/theory.md#estimators``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fisher_monitor.metrics import diagonal_statistics
from fisher_monitor.structures.base import LayerInput, LayerResult, Structure

if TYPE_CHECKING:  # the estimators import the structures' base module
    from fisher_monitor.estimators import SketchDesign


class Diagonal(Structure):
    """``F_S = diag F``, ``EF_S = diag EF``: every metric is a sum of elementwise terms.

    Attributes:
        sketch: The sketch of the pass when the Fisher's factor is estimated (set with
            :meth:`estimate_from`), else ``None``.
    """

    name = "diag"
    needs_factors = False

    def __init__(self) -> None:
        self.sketch: SketchDesign | None = None

    def estimate_from(self, sketch: SketchDesign | None) -> None:
        """Estimate from a sketched pass (``None``: exact); a sketch needs the factors."""
        self.sketch = sketch
        self.needs_factors = sketch is not None

    def layer(self, layer: LayerInput, directions: bool = False) -> LayerResult:  # noqa: D102
        if self.sketch is not None:
            return _sketched(layer, self.sketch, directions)
        f, e, g = layer.fisher_diag, layer.empirical_diag, layer.gradient
        statistics = diagonal_statistics(f, e, g, layer.dampings)
        found = None
        if directions:
            found = [(g / (f + d), g / (e + d)) for d in layer.dampings]
        return LayerResult(statistics, found)


def _sketched(layer: LayerInput, sketch: SketchDesign, directions: bool) -> LayerResult:
    """Replicate statistics of the sketched diagonal; plug-in directions (full estimate)."""
    from fisher_monitor.estimators import (
        EstimatedResult,
        group_fisher_diagonals,
        sketched_diagonal_replicates,
    )

    factors = layer.require_factors()
    groups = layer.cached(
        "sketch_group_diagonals", lambda: group_fisher_diagonals(factors, sketch.groups)
    )
    e, g = layer.empirical_diag, layer.gradient
    replicates, dampings = sketched_diagonal_replicates(
        groups, e, g, layer.dampings, sketch.relative_damping
    )
    found = None
    if directions:
        f = groups.sum(dim=0)
        found = [(g / (f + d), g / (e + d)) for d in dampings[0]]
    return EstimatedResult(replicates.full, found, replicates=replicates)
