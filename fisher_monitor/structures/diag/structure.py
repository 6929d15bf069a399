"""``diag``: the diagonals of F and EF (see the theory page, ``docs/theory.md``).

The exact structure runs after the pass on the collected (and, under data parallelism,
reduced) diagonals (:mod:`~.statistics`). When the cost model
(:mod:`fisher_monitor.engine.cost`) replaces the exact factor by a sketch, the structure
runs during the pass instead, where the sketched columns can still be split into their
replicate groups for the standard errors (:mod:`~.sketched`, ``docs/theory.md#estimators``).
"""

from __future__ import annotations

from fisher_monitor.factors import RATES, LayerShape, PassSize
from fisher_monitor.factors.shape import CURVATURE_BYTES
from fisher_monitor.structures.base import LayerInput, LayerResult, Structure
from fisher_monitor.structures.diag.sketched import (
    group_fisher_diagonals,
    sketched_diagonal_replicates,
)
from fisher_monitor.structures.diag.statistics import DIAGONAL_CHUNK, diagonal_statistics

#: Elementwise float64 passes over each entry, per damping plus one (in units of
#: ``RATES.entry``; measured with ``benchmarks/metrics_micro.py``: the MLP's 536k entries
#: take 6.2–7.0 ms with one damping and 19.9–21.0 ms with five on the 2-core AVX-512
#: machine, 2.5–2.85 and 8.0–8.5 plain steps, where 5 passes modelled 1.1 and 3.4).
FLOPS_PER_ENTRY = 12.0


class Diagonal(Structure):
    """``F_S = diag F``, ``EF_S = diag EF``: every metric is a sum of elementwise terms.

    Args:
        sketch: The sketch of the pass when the Fisher's factor is estimated, else ``None``.
    """

    name = "diag"
    sketch_unavailable = frozenset()  # every diagonal metric has an estimate

    @property
    def needs_factors(self) -> bool:
        """Only a sketch needs the factors (to split its columns into replicate groups)."""
        return self.sketch is not None

    def layer(self, layer: LayerInput, directions: bool = False) -> LayerResult:  # noqa: D102
        if self.sketch is not None:
            return _sketched(layer, self.sketch, directions)
        f, e, g = layer.fisher_diag, layer.empirical_diag, layer.gradient
        statistics = diagonal_statistics(f, e, g, layer.dampings)
        found = None
        if directions:
            found = [(g / (f + d), g / (e + d)) for d in layer.dampings]
        return LayerResult(statistics, found)

    def flops(self, shape: LayerShape, size: PassSize) -> float:
        """Elementwise work over the layer's ``D`` entries (the diagonals come with the pass)."""
        passes = FLOPS_PER_ENTRY * (1 + size.dampings)
        if self.sketch is not None:
            passes *= self.sketch.groups + 1
        return RATES.entry * passes * shape.dimension

    def peak_bytes(self, shape: LayerShape, size: PassSize) -> int:
        """A reused chunk buffer; under a sketch, the group diagonals."""
        rows = 8 + 4 * size.dampings
        if self.sketch is None:
            return rows * min(shape.dimension, DIAGONAL_CHUNK) * CURVATURE_BYTES
        return (self.sketch.groups + rows) * shape.dimension * CURVATURE_BYTES


def _sketched(layer: LayerInput, sketch, directions: bool) -> LayerResult:
    """Replicate statistics of the sketched diagonal; plug-in directions (full estimate)."""
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
    return LayerResult(replicates.full, found, replicates=replicates)


__all__ = ["Diagonal"]
