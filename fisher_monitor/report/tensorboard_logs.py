"""Find TensorBoard runs and load what fisher-monitor logged in them, from the logs alone.

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
from collections.abc import Iterable, Sequence
from pathlib import Path

from fisher_monitor import keys, runinfo
from fisher_monitor.report.events import (
    EventData,
    EventFileError,
    event_files,
    read_directory,
)
from fisher_monitor.report.progress import Progress
from fisher_monitor.report.runs import HISTOGRAM_GROUP, NoFisherDataError, ReportError, Run
from fisher_monitor.report.text import encodable

#: :func:`fisher_monitor.keys.parse_key`, remembered: the runs of a sweep share their tags.
_parse_key = functools.lru_cache(maxsize=2**16)(keys.parse_key)


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


__all__ = ["find_runs", "load_run", "load_tensorboard_runs"]
