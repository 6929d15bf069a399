"""Find runs and load what fisher-monitor logged in them, from the logs alone.

:func:`load_runs` reads any mix of TensorBoard runs (event files,
:mod:`~fisher_monitor.report.tensorboard_logs`), Lightning ``CSVLogger`` directories and
MLflow file stores (:mod:`~fisher_monitor.report.loggers`) into :class:`Run` objects
(:mod:`~fisher_monitor.report.runs`). Nothing here needs the model or torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from fisher_monitor.report.loggers import load_any
from fisher_monitor.report.progress import Progress
from fisher_monitor.report.runs import NoFisherDataError, ReportError, Run
from fisher_monitor.report.tensorboard_logs import find_runs, load_run, load_tensorboard_runs


def load_runs(
    paths: Iterable[str | Path], strict: bool = False, progress: Progress | None = None
) -> list[Run]:
    """Find and load every run under ``paths``: TensorBoard, CSVLogger and MLflow logs.

    Paths holding TensorBoard event files are read by
    :func:`~fisher_monitor.report.tensorboard_logs.load_tensorboard_runs`; CSV and MLflow
    runs by :mod:`fisher_monitor.report.loggers`, which dispatches.

    Args:
        paths: Run directories or their parents (several kinds may be mixed).
        strict: Refuse damaged input instead of reading what is valid.
        progress: Progress display.

    Raises:
        ReportError: For bad input, or when no run under the given paths could be loaded.
    """
    return load_any(paths, strict, progress or Progress(), load_tensorboard_runs)


__all__ = [
    "NoFisherDataError",
    "ReportError",
    "Run",
    "find_runs",
    "load_run",
    "load_runs",
    "load_tensorboard_runs",
]
