"""``diag``: the diagonals of F and EF (see the theory page, ``docs/theory.md``)."""

from __future__ import annotations

from fisher_monitor.metrics import diagonal_statistics
from fisher_monitor.structures.base import LayerInput, LayerResult, Structure


class Diagonal(Structure):
    """``F_S = diag F``, ``EF_S = diag EF``: every metric is a sum of elementwise terms."""

    name = "diag"
    needs_factors = False

    def layer(self, layer: LayerInput, directions: bool = False) -> LayerResult:  # noqa: D102
        f, e, g = layer.fisher_diag, layer.empirical_diag, layer.gradient
        statistics = diagonal_statistics(f, e, g, layer.dampings)
        found = None
        if directions:
            found = [(g / (f + d), g / (e + d)) for d in layer.dampings]
        return LayerResult(statistics, found)
