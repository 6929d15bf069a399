"""Pure tensor maths: statistics of F against EF for each structure, and the metrics.

Nothing here knows about BackPACK, models or losses: every function takes tensors
(diagonals, dense blocks, Gram matrices, Kronecker factors) and returns additive
:class:`~fisher_monitor.metrics.statistics.LayerStatistics`, which
:func:`~fisher_monitor.metrics.statistics.finalize` turns into the metrics (docs/theory.md#metrics).
"""

from fisher_monitor.keys import DAMPED_METRICS, METRICS, UNDAMPED_METRICS, damping_suffix
from fisher_monitor.metrics.dense import dense_statistics
from fisher_monitor.metrics.diagonal import diagonal_statistics
from fisher_monitor.metrics.kronecker import OuterSamples, kronecker_statistics
from fisher_monitor.metrics.lowrank import lowrank_statistics
from fisher_monitor.metrics.statistics import (
    DampedStatistics,
    LayerStatistics,
    NumericalError,
    finalize,
    sum_statistics,
)

__all__ = [
    "DAMPED_METRICS",
    "METRICS",
    "UNDAMPED_METRICS",
    "DampedStatistics",
    "LayerStatistics",
    "NumericalError",
    "OuterSamples",
    "damping_suffix",
    "dense_statistics",
    "diagonal_statistics",
    "finalize",
    "kronecker_statistics",
    "lowrank_statistics",
    "sum_statistics",
]
