"""Runs of an MLflow file store (``mlruns/``), read as files: no ``mlflow`` import.

A run is a directory ``mlruns/<experiment id>/<run id>/`` with ``meta.yaml`` and
``metrics/``: each metric is a file whose path below ``metrics/`` is its key (keys with
``/`` are nested folders), one line ``"<timestamp> <value> <step>"`` per logged value.
Parameters are files below ``params/`` holding their value as text, tags below ``tags/``
(``mlflow.runName``). The callback's MLflow writer logs the monitor's keys under the
prefix without the characters MLflow refuses (``~fisher`` becomes ``fisher``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from fisher_monitor.report.logruns import make_runs
from fisher_monitor.report.runs import ReportError, Run


def is_run(directory: Path) -> bool:
    """Whether ``directory`` is an MLflow file-store run (``meta.yaml`` and ``metrics/``)."""
    return (directory / "meta.yaml").is_file() and (directory / "metrics").is_dir()


def find(path: Path) -> list[Path]:
    """MLflow runs at or under ``path`` (a store, an experiment or a run), sorted."""
    if not path.is_dir():
        return []
    if is_run(path):
        return [path]
    found = []
    try:
        for meta in path.rglob("meta.yaml"):
            if is_run(meta.parent) and "metrics" not in meta.parent.relative_to(path).parts:
                found.append(meta.parent)
    except OSError as error:
        raise ReportError(f"{path}: cannot list the directory ({error.strerror})") from None
    return sorted(found)


def _files(root: Path) -> dict[str, Path]:
    """Every file below ``root`` by its relative ``/``-joined path (the MLflow key)."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            found[path.relative_to(root).as_posix()] = path
    return found


def read_metrics(
    directory: Path, strict: bool = False
) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """Per metric key, its ``(step, value)`` pairs; and what could not be read.

    Raises:
        ReportError: For an unreadable file, or (with ``strict``) a malformed line.
    """
    series: dict[str, list[tuple[int, float]]] = {}
    bad = 0
    for key, path in _files(directory / "metrics").items():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise ReportError(f"{path}: cannot read ({error})") from None
        values: dict[int, float] = {}
        for number, line in enumerate(lines, start=1):
            parts = line.split()
            try:
                value, step = float(parts[1]), int(parts[2])
            except (IndexError, ValueError):
                bad += 1
                if strict:
                    raise ReportError(
                        f"{path}:{number}: {line!r} is not 'timestamp value step'"
                    ) from None
                continue
            if math.isfinite(value):
                values[step] = value
        if values:
            series[key] = sorted(values.items())
    notes = [f"{directory}: skipped {bad} malformed metric line(s)"] if bad else []
    return series, notes


def read_params(directory: Path) -> dict[str, str]:
    """The run's parameters (``params/`` files) by key."""
    params = {}
    for key, path in _files(directory / "params").items():
        try:
            params[key] = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            continue
    return params


def display_name(directory: Path, fallback: str) -> str:
    """``"{experiment name}/{run name}"`` from the store's files, else ``fallback``."""
    try:
        run_name = (directory / "tags" / "mlflow.runName").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return fallback
    experiment = directory.parent.name
    try:
        for line in (directory.parent / "meta.yaml").read_text(encoding="utf-8").splitlines():
            if line.startswith("name:"):
                experiment = line.split(":", 1)[1].strip()
    except (OSError, UnicodeDecodeError):
        pass
    return f"{experiment}/{run_name}" if run_name else fallback


def read_run(name: str, directory: Path, strict: bool = False) -> list[Run]:
    """The fisher-monitor runs (one per prefix) of an MLflow file-store run."""
    scalars, notes = read_metrics(directory, strict)
    params = read_params(directory)
    return make_runs(display_name(directory, name), directory, scalars, params, notes)


__all__ = ["display_name", "find", "is_run", "read_metrics", "read_params", "read_run"]
