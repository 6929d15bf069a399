"""Find runs and load what fisher-monitor logged in them, from the logs alone.

A *run* is a directory holding ``events.out.tfevents.*`` files with fisher-monitor
scalars (e.g. a Lightning ``version_N`` folder); a path given by the user is either a run
or a parent directory searched recursively. The scalars come from the event files (read
once, see :mod:`fisher_monitor.report.events`); the settings, the layers with their
dimensions, the notes and the end-of-fit numbers from the run-information file the
callback writes next to them (:mod:`fisher_monitor.runinfo`). A run without that file
is reported from its scalars alone. Two monitors with different logging prefixes in one
directory are two runs. Nothing here needs the model or torch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from fisher_monitor import keys, runinfo
from fisher_monitor.report.events import (
    EventData,
    EventFileError,
    HistogramSeries,
    event_files,
    read_directory,
)
from fisher_monitor.report.progress import Progress
from fisher_monitor.report.text import encodable

HISTOGRAM_GROUP = "histograms/log10_ef_over_f"


#: :func:`fisher_monitor.keys.parse_key`, remembered: the runs of a sweep share their tags.
_parse_key = functools.lru_cache(maxsize=2**16)(keys.parse_key)


class ReportError(Exception):
    """Bad input for a report: the message is one line meant for the user."""


class NoFisherDataError(ReportError):
    """Event files without fisher-monitor scalars (a parent directory may skip them)."""


def _as_arrays(series) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(series, tuple) and len(series) == 2 and isinstance(series[0], np.ndarray):
        return series
    pairs = list(series)
    return (
        np.array([int(s) for s, _ in pairs], dtype=np.int64),
        np.array([float(v) for _, v in pairs], dtype=float),
    )


@dataclass
class Run:
    """Everything fisher-monitor logged in one run.

    Attributes:
        name: Display name (the path relative to what the user gave; made unique).
        path: Directory of the event files.
        prefix: Logging prefix (``"fisher"`` by default).
        scalars: Per key without the prefix (``"block/direction_cosine/all"``,
            ``"probe/loss"``), the logged ``(steps, values)`` arrays in step order. A
            list of ``(step, value)`` pairs is accepted and converted.
        settings: The callback's settings from the run-information file (may be empty).
        layer_info: Per layer, its entry of the run-information file (``type``,
            ``parameters``, ``dimension``, ``backend``, ``measured``, ``reason``).
        notes: Notes of the measurements.
        fit: End-of-fit numbers (``measurements``, ``monitor_seconds``, ``overhead``, ...).
        histograms: Per layer, the logged histograms of ``log10(EF_ii / F_ii)``.
        read_notes: What could not be read (bytes skipped at the end of a file).
    """

    name: str
    path: Path
    prefix: str
    scalars: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    layer_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    fit: dict[str, Any] = field(default_factory=dict)
    histograms: dict[str, HistogramSeries] = field(default_factory=dict)
    read_notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.scalars = {key: _as_arrays(series) for key, series in self.scalars.items()}

    @cached_property
    def parsed(self) -> dict[str, keys.ParsedKey]:
        """The parts of each structure or optimizer key."""
        return {key: p for key in self.scalars if (p := _parse_key(key)) is not None}

    @cached_property
    def structures(self) -> list[str]:
        """Structures present, in the order diag, block, kron."""
        present = {p.structure for p in self.parsed.values()}
        return [s for s in keys.STRUCTURES if s in present]

    @cached_property
    def primary_structure(self) -> str:
        """The structure verdicts are based on: block, else kron, else diag."""
        structure = keys.primary_structure(self.structures)
        if structure is None:
            raise ReportError(f"{self.name}: no structure found")
        return structure

    @cached_property
    def dampings(self) -> list[str]:
        """Damping suffixes present (``[""]`` with one damping, else ``["@0.001", ...]``).

        From any damped metric, the direction cosine's first: a run may lack it (a
        sketched Fisher side, a diagonal-only run) and still be measured at several λ.
        """
        suffixes: list[str] = []
        damped = [p for p in self.parsed.values() if p.metric in keys.DAMPED_METRICS]
        for parsed in sorted(damped, key=lambda p: p.metric != "direction_cosine"):
            suffix = f"@{parsed.damping}" if parsed.damping else ""
            if not parsed.stderr and suffix not in suffixes:
                suffixes.append(suffix)
        return suffixes or [""]

    @cached_property
    def layers(self) -> list[str]:
        """Layer names, in the network's order when the run-information file lists them."""
        found = {
            p.layer
            for p in self.parsed.values()
            if p.layer != keys.ALL and p.structure != keys.OPTIMIZER
        }
        ordered = [name for name in self.layer_info if name in found]
        return ordered + sorted(found.difference(ordered))

    @cached_property
    def steps(self) -> list[int]:
        """Steps with a measurement: those where any metric of the primary structure was logged.

        Not only the direction cosine: a measurement may hold any subset of the metrics
        (a sketched Fisher side has no block direction cosine; a diagonal-only or
        Kronecker-only run has its own), and each of its steps counts.
        """
        structure = self.primary_structure
        found = [self.scalars[key][0] for key, p in self.parsed.items() if p.structure == structure]
        if not found:
            return []
        return [int(step) for step in np.unique(np.concatenate(found))]

    @cached_property
    def has_update_audit(self) -> bool:
        """Whether the optimizer's steps were audited (``update_*_cosine`` keys)."""
        return any(p.metric in keys.UPDATE_METRICS for p in self.parsed.values())

    @cached_property
    def optimizer_name(self) -> str | None:
        """The optimizer's class name from the settings (``None`` when unknown)."""
        name = self.settings.get("optimizer")
        return str(name) if name else None

    def key(
        self,
        metric: str,
        layer: str = keys.ALL,
        structure: str | None = None,
        damping: str | None = None,
    ) -> str:
        """The scalar key of a metric (damped metrics get the first damping's suffix)."""
        structure = structure or self.primary_structure
        if structure == keys.OPTIMIZER:
            return keys.optimizer_key(metric, layer)
        suffix = ""
        if metric in keys.DAMPED_METRICS:
            suffix = self.dampings[0] if damping is None else damping
        return keys.metric_key(structure, metric, layer, suffix)

    def stderr_key(self, key: str) -> str | None:
        """The key of the standard error of ``key`` (``None`` when ``key`` is not a metric)."""
        parsed = keys.parse_key(key)
        if parsed is None or parsed.stderr:
            return None
        suffix = f"@{parsed.damping}" if parsed.damping else ""
        return keys.stderr_key(parsed.structure, parsed.metric, parsed.layer, suffix)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one key (empty arrays when it was never logged)."""
        found = self.scalars.get(key)
        if found is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=float)
        return found

    def value(self, key: str, step: int) -> float:
        """Value of ``key`` at ``step`` (``nan`` when missing)."""
        steps, values = self.series(key)
        index = int(np.searchsorted(steps, step))
        if index < len(steps) and steps[index] == step:
            return float(values[index])
        return float("nan")

    def values_at(self, step: int) -> dict[str, float]:
        """Every key's value at ``step`` (keys not logged at that step are left out).

        The tags of a run mostly share one steps array (:mod:`~fisher_monitor.report.
        events`): the step is looked up once per distinct array, and the result is kept
        per step (the report asks for the last and the worst step several times).
        """
        cache = self.__dict__.setdefault("_values_at", {})
        if step not in cache:
            found: dict[str, float] = {}
            where: dict[int, int] = {}  # id of a steps array -> index of ``step`` (or -1)
            for key, (steps, values) in self.scalars.items():
                index = where.get(id(steps))
                if index is None:
                    index = int(np.searchsorted(steps, step))
                    found_step = index < len(steps) and steps[index] == step
                    index = where[id(steps)] = index if found_step else -1
                if index >= 0 and not math.isnan(value := float(values[index])):
                    found[key] = value
            cache[step] = found
        return dict(cache[step])

    @cached_property
    def dimensions(self) -> dict[str, float]:
        """Per layer (and ``all``), the number of parameters D.

        From the run-information file; for older runs from the logged ``dimension``
        scalars. ``all`` is the sum over the primary structure's layers.
        """
        found: dict[str, float] = {}
        for layer in self.layers:
            entry = self.layer_info.get(layer, {})
            if isinstance(entry.get("dimension"), (int, float)):
                found[layer] = float(entry["dimension"])
                continue
            for structure in self.structures:
                values = self.series(keys.metric_key(structure, "dimension", layer))[1]
                if len(values):
                    found[layer] = float(values[-1])
                    break
        logged = self.series(self.key("dimension"))[1]
        if len(logged):
            found[keys.ALL] = float(logged[-1])
        else:
            primary = {
                p.layer
                for p in self.parsed.values()
                if p.structure == self.primary_structure and p.layer != keys.ALL
            }
            parts = [found[layer] for layer in primary if layer in found]
            if parts and len(parts) == len(primary):
                found[keys.ALL] = float(sum(parts))
        return found


def find_runs(paths: Iterable[str | Path]) -> list[tuple[str, Path, bool]]:
    """Expand user paths into run directories (those holding event files).

    Args:
        paths: Run directories or parents of run directories.

    Returns:
        ``(display name, directory, given)`` triples, sorted within each given path;
        ``given`` is true for a directory the user named itself.

    Raises:
        ReportError: For a path that does not exist or holds no event file.
    """
    runs: list[tuple[str, Path, bool]] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise ReportError(f"{given}: no such directory")
        if path.is_file():
            raise ReportError(f"{given}: expected a run directory, got a file")
        try:
            directories = sorted({f.parent for f in path.rglob("events.out.tfevents.*")})
        except OSError as error:
            raise ReportError(f"{given}: cannot list the directory ({error.strerror})") from None
        if not directories:
            raise ReportError(f"{given}: no TensorBoard event files found")
        for directory in directories:
            relative = directory.relative_to(path)
            name = str(Path(path.name) / relative) if str(relative) != "." else path.name
            # a directory name that is not UTF-8 cannot be drawn or written: show its escapes
            runs.append((encodable(name or str(path)), directory, directory == path))
    return runs


def _prefixes(tags: Iterable[str]) -> dict[str, str]:
    """Per scalar tag of fisher-monitor, its logging prefix (the shortest that parses)."""
    found = {}
    for tag in tags:
        position = tag.find("/")
        while position > 0:
            if _parse_key(tag[position + 1 :]) is not None:
                found[tag] = tag[:position]
                break
            position = tag.find("/", position + 1)
    return found


def _runs_from_events(
    name: str, directory: Path, data: EventData, info: dict[str, dict]
) -> list[Run]:
    by_tag = _prefixes(data.scalars)
    prefixes = sorted(set(by_tag.values()))
    if not prefixes:
        raise NoFisherDataError(f"{directory}: no fisher-monitor data in these event files")
    read_notes = [message for report in data.files if (message := report.message())]
    runs = []
    for prefix in prefixes:
        head = prefix + "/"
        scalars = {
            tag[len(head) :]: series
            for tag, series in data.scalars.items()
            if tag.startswith(head)
            and (by_tag.get(tag) == prefix or tag.startswith(head + keys.PROBE + "/"))
        }
        histogram_head = f"{head}{HISTOGRAM_GROUP}/"
        histograms = {
            tag[len(histogram_head) :]: series
            for tag, series in data.histograms.items()
            if tag.startswith(histogram_head)
        }
        stored = info.get(prefix, {})
        layers = stored.get("layers") or []
        run = Run(
            name=name if len(prefixes) == 1 else f"{name} [{prefix}]",
            path=directory,
            prefix=prefix,
            scalars=scalars,
            settings=dict(stored.get("settings") or {}),
            layer_info={
                str(entry["layer"]): dict(entry)
                for entry in layers
                if isinstance(entry, dict) and "layer" in entry
            },
            notes=[str(note) for note in stored.get("notes") or []],
            fit=dict(stored.get("fit") or {}),
            histograms=histograms,
            read_notes=list(read_notes),
        )
        if not run.structures:
            continue
        if not run.steps:
            raise ReportError(f"{directory}: fisher-monitor data without any complete measurement")
        runs.append(run)
    if not runs:
        raise NoFisherDataError(f"{directory}: no fisher-monitor data in these event files")
    return runs


def _keep_histogram(tag: str) -> bool:
    return f"/{HISTOGRAM_GROUP}/" in tag


def load_run(
    name: str, directory: Path, strict: bool = False, progress: Progress | None = None
) -> list[Run]:
    """Load the runs (one per logging prefix) of one directory.

    Args:
        name: Display name.
        directory: Directory holding the event files.
        strict: Refuse event files with a damaged or partial record.
        progress: Told about the bytes read and about skipped bytes.

    Returns:
        The runs (usually one).

    Raises:
        ReportError: For an unreadable directory, a damaged file with ``strict``, or a
            directory without fisher-monitor data.
    """
    progress = progress or Progress()
    try:
        data = read_directory(
            directory, strict=strict, keep_histogram=_keep_histogram, on_bytes=progress.advance
        )
    except EventFileError as error:
        raise ReportError(str(error)) from None
    except OSError as error:
        raise ReportError(f"{directory}: cannot read event files ({error.strerror})") from None
    if not any(report.records for report in data.files):
        problems = "; ".join(r.message() or f"{r.path}: empty" for r in data.files)
        raise ReportError(f"{directory}: no readable event record ({problems})")
    try:
        info = runinfo.read(directory)
    except runinfo.RunFileError as error:  # the file and the field, in one line
        raise ReportError(str(error)) from None
    runs = _runs_from_events(name, directory, data, info)
    for report in data.files:  # once per file, and only for a run that is reported
        if (message := report.message()) is not None:
            progress.warn(message)
    return runs


def _unique_names(runs: Sequence[Run]) -> None:
    """Give runs with the same name their distinct path parts (``a/version_0``)."""
    names = [run.name for run in runs]
    if len(set(names)) == len(names):
        return
    parts = [run.path.resolve().parts for run in runs]
    for index, run in enumerate(runs):
        if names.count(run.name) == 1:
            continue
        others = [p for j, p in enumerate(parts) if j != index and names[j] == run.name]
        depth = 1
        while depth < len(parts[index]) and any(
            other[-depth:] == parts[index][-depth:] for other in others
        ):
            depth += 1
        suffix = encodable(Path(*parts[index][-depth:]))  # as in find_runs: valid UTF-8
        run.name = suffix if not run.name.endswith("]") else f"{suffix} {run.name.split()[-1]}"


def load_runs(
    paths: Iterable[str | Path], strict: bool = False, progress: Progress | None = None
) -> list[Run]:
    """Find and load every run under ``paths``: TensorBoard, CSVLogger and MLflow logs.

    Paths holding TensorBoard event files are read by :func:`load_tensorboard_runs`; CSV
    and MLflow runs by :mod:`fisher_monitor.report.loggers`, which dispatches.
    """
    from fisher_monitor.report.loggers import load_any  # it builds on this module's Run

    return load_any(paths, strict, progress or Progress(), load_tensorboard_runs)


def load_tensorboard_runs(
    paths: Iterable[str | Path], strict: bool = False, progress: Progress | None = None
) -> list[Run]:
    """Find and load every TensorBoard run under ``paths``.

    A run the user named itself must load. Under a parent directory, a run that cannot be
    read is reported (one warning line) and skipped; the others are loaded.

    Args:
        paths: Run directories or their parents.
        strict: Refuse event files with a damaged or partial record.
        progress: Progress display (stages: finding runs, reading events).

    Returns:
        The runs, in the order found, with unique names.

    Raises:
        ReportError: For bad input (see :func:`find_runs` and :func:`load_run`), or when
            no run under the given paths could be loaded.
    """
    progress = progress or Progress()
    progress.stage("finding runs")
    found = find_runs(paths)
    sizes = []
    for _, directory, _ in found:
        try:
            sizes.append(sum(f.stat().st_size for f in event_files(directory)))
        except OSError:
            sizes.append(0)
    runs: list[Run] = []
    skipped: list[str] = []
    progress.stage(
        f"reading events of {len(found)} run{'s' * (len(found) != 1)}", sum(sizes), "bytes"
    )
    for name, directory, given in found:
        try:
            runs.extend(load_run(name, directory, strict, progress))
        except ReportError as error:
            if given or strict:
                raise
            if not isinstance(error, NoFisherDataError):  # other TensorBoard runs: skipped quietly
                progress.warn(f"skipped run {name}: {error}")
            skipped.append(str(error))
    if not runs:
        raise ReportError(skipped[0] if skipped else "no fisher-monitor data found")
    _unique_names(runs)
    return runs


__all__ = ["NoFisherDataError", "ReportError", "Run", "find_runs", "load_run", "load_runs"]
