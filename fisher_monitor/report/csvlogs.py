"""Runs of Lightning's ``CSVLogger``: ``metrics.csv`` and ``hparams.yaml`` in a log directory.

``metrics.csv`` has a ``step`` column and one column per logged key (the monitor's are
``{prefix}/{structure}/{metric}/{layer}``); each ``log_metrics`` call is one row, with
the keys it did not log left empty. ``hparams.yaml`` holds the callback's settings as
``{prefix}/{setting}`` and the layers' dimensions as ``{prefix}/dimension/{layer}``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from fisher_monitor.report.logruns import make_runs
from fisher_monitor.report.runs import ReportError, Run

METRICS_FILE = "metrics.csv"
HPARAMS_FILE = "hparams.yaml"


def find(path: Path) -> list[Path]:
    """Directories holding a ``metrics.csv`` at or under ``path``, sorted."""
    if not path.is_dir():
        return []
    try:
        return sorted({file.parent for file in path.rglob(METRICS_FILE)})
    except OSError as error:
        raise ReportError(f"{path}: cannot list the directory ({error.strerror})") from None


def read_hyperparameters(directory: Path) -> dict:
    """``hparams.yaml`` as a flat dict (empty when missing or not a mapping)."""
    path = directory / HPARAMS_FILE
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return {str(k): v for k, v in data.items()} if isinstance(data, dict) else {}


def read_metrics(
    directory: Path, strict: bool = False
) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """Per column, its ``(step, value)`` pairs; and what could not be read.

    Empty cells are left out; so are cells that are not numbers (with ``strict``, they
    are an error) and NaN. A later value at the same step replaces an earlier one.

    Raises:
        ReportError: For an unreadable file, one without a ``step`` column, or (with
            ``strict``) a cell that is not a number.
    """
    path = directory / METRICS_FILE
    series: dict[str, dict[int, float]] = {}
    bad = 0
    try:
        with path.open(newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            if "step" not in (reader.fieldnames or []):
                raise ReportError(f"{path}: no 'step' column (not a CSVLogger metrics file)")
            for line, row in enumerate(reader, start=2):
                try:
                    step = int(float(row["step"]))
                except (TypeError, ValueError):
                    bad += 1
                    if strict:
                        raise ReportError(
                            f"{path}:{line}: step {row['step']!r} is not a number"
                        ) from None
                    continue
                for column, cell in row.items():
                    if column in (None, "step", "epoch") or cell in (None, ""):
                        continue
                    try:
                        value = float(cell)
                    except (TypeError, ValueError):
                        bad += 1
                        if strict:
                            raise ReportError(
                                f"{path}:{line}: {column} = {cell!r} is not a number"
                            ) from None
                        continue
                    if math.isfinite(value):
                        series.setdefault(column, {})[step] = value
    except OSError as error:
        raise ReportError(f"{path}: cannot read ({error.strerror})") from None
    except (csv.Error, UnicodeDecodeError) as error:
        raise ReportError(f"{path}: not a readable CSV file ({error})") from None
    notes = [f"{path}: skipped {bad} cell(s) that are not numbers"] if bad else []
    return {key: sorted(values.items()) for key, values in series.items()}, notes


def read_run(name: str, directory: Path, strict: bool = False) -> list[Run]:
    """The fisher-monitor runs (one per prefix) of a ``CSVLogger`` log directory."""
    scalars, notes = read_metrics(directory, strict)
    return make_runs(name, directory, scalars, read_hyperparameters(directory), notes)


__all__ = ["find", "read_hyperparameters", "read_metrics", "read_run"]
