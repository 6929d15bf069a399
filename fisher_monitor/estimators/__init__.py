"""Estimators of the Fisher side whose cost does not grow with the number of classes.

When the exact Fisher's square-root factor (``R_n = (C − 1)·T`` columns per sample for a
cross-entropy) would not fit the time or memory budget (:mod:`fisher_monitor.engine.cost`),
the pass backpropagates ``k`` sketched columns per sample instead
(:mod:`fisher_monitor.likelihoods.sketched`), drawn in independent replicate groups
(:mod:`~fisher_monitor.estimators.sketch_design`); each structure turns them into replicate
statistics (``structures/<name>/sketched.py``), and the jackknife
(:mod:`~fisher_monitor.estimators.jackknife`) into metrics with standard errors
(``docs/theory.md#estimators``).
"""

from fisher_monitor.estimators.jackknife import (
    Estimate,
    Replicates,
    add_estimated_metrics,
    estimated_metrics,
    jackknife,
    sum_replicates,
)
from fisher_monitor.estimators.sketch_design import (
    SketchDesign,
    consistent_squares,
    pair_means,
    replicate_dampings,
    replicate_weights,
)

__all__ = [
    "Estimate",
    "Replicates",
    "SketchDesign",
    "add_estimated_metrics",
    "consistent_squares",
    "estimated_metrics",
    "jackknife",
    "pair_means",
    "replicate_dampings",
    "replicate_weights",
    "sum_replicates",
]
