"""Runs from loggers other than TensorBoard: Lightning's ``CSVLogger`` and MLflow file stores.

The callback logs the same keys to every logger (``{prefix}/{structure}/{metric}/{layer}``,
joined by ``/``), and its settings and each layer's dimension as hyperparameters
(``{prefix}/{setting}``, ``{prefix}/dimension/{layer}``). A CSV or MLflow run is read from
those alone: the scalars give the verdicts and tables, the hyperparameters the settings
(the optimizer, the loss, the structures) and the dimensions. Where a run-information file
(:mod:`fisher_monitor.runinfo`) lies beside the logs, it is used as for TensorBoard runs.
What only TensorBoard holds (histograms, the heat-map image) is absent; the report draws
its figures from the scalars.

:func:`load_any` splits the paths a user gives: a path holding TensorBoard event files is
read by :func:`fisher_monitor.report.tensorboard_logs.load_tensorboard_runs`, a path
holding only CSV or MLflow runs by :mod:`fisher_monitor.report.csvlogs` and
:mod:`fisher_monitor.report.mlflowlogs`. A CSV or MLflow run in a directory that also
holds event files is left to the TensorBoard reader (Lightning's loggers share
``version_N`` directories).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from fisher_monitor.report import csvlogs, mlflowlogs
from fisher_monitor.report.progress import Progress
from fisher_monitor.report.runs import NoFisherDataError, ReportError, Run

#: Reads one found run: ``reader(display name, directory, strict)``.
Reader = Callable[[str, Path, bool], list[Run]]


def _has_events(directory: Path) -> bool:
    return any(directory.glob("events.out.tfevents.*"))


def find_logger_runs(path: Path) -> list[tuple[str, Path, Reader]]:
    """CSV and MLflow runs under ``path`` (or ``path`` itself), with the reader of each.

    Directories that also hold TensorBoard event files are left out.
    """
    found: list[tuple[str, Path, Reader]] = []
    for directory, reader in [
        *((d, csvlogs.read_run) for d in csvlogs.find(path)),
        *((d, mlflowlogs.read_run) for d in mlflowlogs.find(path)),
    ]:
        if _has_events(directory):
            continue
        relative = directory.relative_to(path)
        name = str(Path(path.name) / relative) if str(relative) != "." else path.name
        found.append((name or str(path), directory, reader))
    return found


def load_any(
    paths: Iterable[str | Path],
    strict: bool,
    progress: Progress,
    load_tensorboard: Callable[..., list[Run]],
) -> list[Run]:
    """Load the runs under ``paths``: TensorBoard event files, CSVLogger and MLflow runs.

    Args:
        paths: Run directories or their parents (several kinds may be mixed).
        strict: Refuse damaged input instead of reading what is valid.
        progress: Progress display.
        load_tensorboard: The TensorBoard loader, called with the paths that hold event
            files (and with those holding nothing recognisable, for its error message).

    Returns:
        The runs, TensorBoard's first, with unique names.

    Raises:
        ReportError: As the TensorBoard loader, or for a CSV or MLflow run the user named
            that cannot be read.
    """
    tensorboard: list[str | Path] = []
    others: list[tuple[str, Path, Reader, bool]] = []
    for given in paths:
        path = Path(given)
        logger_runs = find_logger_runs(path) if path.is_dir() else []
        has_events = path.is_dir() and any(path.rglob("events.out.tfevents.*"))
        if path.is_dir() and not has_events and not logger_runs:
            raise ReportError(
                f"{given}: no TensorBoard event files found, nor a CSVLogger metrics.csv or an "
                "MLflow run"
            )
        if has_events or not path.is_dir():  # a missing path: the TensorBoard reader says so
            tensorboard.append(given)
        for name, directory, reader in logger_runs:
            others.append((name, directory, reader, directory == path))
    runs = load_tensorboard(tensorboard, strict, progress) if tensorboard else []
    if others:
        progress.stage(f"reading {len(others)} CSV/MLflow run{'s' * (len(others) != 1)}")
    for name, directory, reader, given in others:
        try:
            runs.extend(reader(name, directory, strict))
        except ReportError as error:
            if given or strict:
                raise
            if not isinstance(error, NoFisherDataError):
                progress.warn(f"skipped run {name}: {error}")
    if not runs:
        raise ReportError("no fisher-monitor data found")
    _unique_names(runs)
    return runs


def _unique_names(runs: Sequence[Run]) -> None:
    """Runs of different loggers with the same name: their directories tell them apart."""
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = str(run.path)


__all__ = ["Reader", "find_logger_runs", "load_any"]
