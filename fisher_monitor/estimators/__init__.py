"""Estimators of the Fisher side whose cost does not grow with the number of classes.

When the exact Fisher's square-root factor (``R_n = (C − 1)·T`` columns per sample for a
cross-entropy) would not fit the time or memory budget (:mod:`fisher_monitor.engine.cost`),
the pass backpropagates ``k`` sketched columns per sample instead
(:mod:`~fisher_monitor.estimators.sketch`), drawn in independent replicate groups
(:mod:`~fisher_monitor.estimators.groups`); the structures turn them into replicate
statistics (:mod:`~fisher_monitor.estimators.diagonal`,
:mod:`~fisher_monitor.estimators.block`), and the jackknife
(:mod:`~fisher_monitor.estimators.replicates`) into metrics with standard errors. The
theory, with bias, variance and cost, is on ``docs/theory.md#estimators``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fisher_monitor.estimators.block import FISHER_INVERSE_METRICS, sketched_block_replicates
from fisher_monitor.estimators.diagonal import replicate_dampings, sketched_diagonal_replicates
from fisher_monitor.estimators.groups import (
    SketchDesign,
    group_fisher_diagonals,
    replicate_weights,
)
from fisher_monitor.estimators.replicates import (
    Estimate,
    Replicates,
    add_estimated_metrics,
    estimated_metrics,
    jackknife,
    sum_replicates,
)
from fisher_monitor.estimators.sketch import SketchedLikelihood, sketch_columns, sketching
from fisher_monitor.structures.base import LayerResult


@dataclass
class EstimatedResult(LayerResult):
    """A structure's result for one layer measured with an estimator.

    ``statistics`` holds the full estimate's (plug-in) statistics, so that code reading
    only them still works; :attr:`replicates` carries what the standard errors need.

    Attributes:
        replicates: The replicate statistics.
    """

    replicates: Replicates | None = None


__all__ = [
    "FISHER_INVERSE_METRICS",
    "Estimate",
    "EstimatedResult",
    "Replicates",
    "SketchDesign",
    "SketchedLikelihood",
    "add_estimated_metrics",
    "estimated_metrics",
    "group_fisher_diagonals",
    "jackknife",
    "replicate_dampings",
    "replicate_weights",
    "sketch_columns",
    "sketched_block_replicates",
    "sketched_diagonal_replicates",
    "sketching",
    "sum_replicates",
]
