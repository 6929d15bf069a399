"""The measurement engine: ``measure()`` and the reusable :class:`Measurer`."""

from fisher_monitor.engine.measurer import BACKENDS, MAX_KEPT_BLOCK, Measurer, measure

__all__ = ["BACKENDS", "MAX_KEPT_BLOCK", "Measurer", "measure"]
