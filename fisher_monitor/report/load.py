"""Read fisher-monitor logs back from TensorBoard event files (TensorBoard's own reader).

A *run* is a directory holding ``events.out.tfevents.*`` files with fisher-monitor
scalars (e.g. a Lightning ``version_N`` folder). A path given by the user is either a run
or a parent directory searched recursively for runs. Nothing here needs the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from fisher_monitor.keys import DAMPED_METRICS, METRICS
from fisher_monitor.settings import Structure, primary_structure

STRUCTURES = tuple(s.value for s in Structure)
_EVENT_GLOB = "events.out.tfevents.*"
_METRIC_TAG = re.compile(
    rf"^(?P<prefix>.+)/(?P<structure>{'|'.join(STRUCTURES)})/(?P<metric>[a-z_]+)"
    r"(?P<damping>@[^/]+)?/(?P<layer>.+)$"
)


class ReportError(Exception):
    """Bad input for a report: the message is one line meant for the user."""


class NoFisherDataError(ReportError):
    """Event files without fisher-monitor scalars (a parent directory may skip them)."""


@dataclass
class Histogram:
    """One logged histogram of ``log10(EF_ii / F_ii)``.

    Attributes:
        step: Training step.
        edges: Bucket edges (``len(counts) + 1``).
        counts: Counts per bucket.
    """

    step: int
    edges: np.ndarray
    counts: np.ndarray


@dataclass
class Run:
    """Everything fisher-monitor logged in one run.

    Attributes:
        name: Display name (the path relative to what the user gave).
        path: Directory of the event files.
        prefix: Logging prefix (``"fisher"`` by default).
        scalars: Per key without the prefix (``"block/direction_cosine/all"``), the logged
            ``(step, value)`` pairs in step order.
        settings: The settings table logged by the callback (may be empty).
        layer_info: Per layer, ``{"type", "parameters", "D"}`` from the settings text.
        notes: Notes logged with the settings.
        histograms: Per layer, the logged histograms in step order.
    """

    name: str
    path: Path
    prefix: str
    scalars: dict[str, list[tuple[int, float]]]
    settings: dict[str, str] = field(default_factory=dict)
    layer_info: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    histograms: dict[str, list[Histogram]] = field(default_factory=dict)

    @cached_property
    def structures(self) -> list[str]:
        """Structures present, in the order diag, block, kron."""
        present = {key.split("/")[0] for key in self.scalars}
        return [s for s in STRUCTURES if s in present]

    @cached_property
    def primary_structure(self) -> str:
        """The structure verdicts are based on: block, else kron, else diag."""
        structure = primary_structure(self.structures)
        if structure is None:  # pragma: no cover - load_run only builds runs with data
            raise ReportError(f"{self.name}: no structure found")
        return structure.value

    @cached_property
    def dampings(self) -> list[str]:
        """Damping suffixes present (``[""]`` with one damping, else ``["@0.001", ...]``)."""
        suffixes = []
        for key in self.scalars:
            match = _METRIC_TAG.match(f"p/{key}")
            if match and match["metric"] == "direction_cosine":
                suffix = match["damping"] or ""
                if suffix not in suffixes:
                    suffixes.append(suffix)
        return suffixes or [""]

    @property
    def layers(self) -> list[str]:
        """Layer names, in forward order when the settings text lists them."""
        found = []
        for key in self.scalars:
            match = _METRIC_TAG.match(f"p/{key}")
            if match and match["layer"] != "all" and match["layer"] not in found:
                found.append(match["layer"])
        ordered = [name for name in self.layer_info if name in found]
        return ordered + sorted(name for name in found if name not in ordered)

    @property
    def steps(self) -> list[int]:
        """Steps with a measurement."""
        key = self.key("direction_cosine", "all")
        return [step for step, _ in self.scalars.get(key, [])]

    def key(
        self,
        metric: str,
        layer: str = "all",
        structure: str | None = None,
        damping: str | None = None,
    ) -> str:
        """The scalar key of a metric (damped metrics get the first damping's suffix)."""
        structure = structure or self.primary_structure
        suffix = (
            (self.dampings[0] if damping is None else damping) if metric in DAMPED_METRICS else ""
        )
        return f"{structure}/{metric}{suffix}/{layer}"

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one key (empty arrays when it was never logged)."""
        pairs = self.scalars.get(key, [])
        return (
            np.array([s for s, _ in pairs], dtype=int),
            np.array([v for _, v in pairs], dtype=float),
        )

    def value(self, key: str, step: int) -> float:
        """Value of ``key`` at ``step`` (``nan`` when missing)."""
        for s, v in self.scalars.get(key, []):
            if s == step:
                return v
        return float("nan")


def find_runs(paths: Iterable[str | Path]) -> list[tuple[str, Path]]:
    """Expand user paths into run directories (those holding event files).

    Args:
        paths: Run directories or parents of run directories.

    Returns:
        ``(display name, directory)`` pairs, sorted within each given path.

    Raises:
        ReportError: For a path that does not exist or holds no event file.
    """
    runs: list[tuple[str, Path]] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise ReportError(f"{given}: no such directory")
        if path.is_file():
            raise ReportError(f"{given}: expected a run directory, got a file")
        directories = sorted({f.parent for f in path.rglob(_EVENT_GLOB)})
        if not directories:
            raise ReportError(f"{given}: no TensorBoard event files found")
        for directory in directories:
            relative = directory.relative_to(path)
            name = str(Path(path.name) / relative) if str(relative) != "." else path.name
            runs.append((name, directory))
    return runs


def _check_event_files(directory: Path) -> None:
    """Read every record of every event file with TensorBoard's record reader.

    TensorBoard's loaders treat a damaged or truncated record as "the file is still being
    written" and stop quietly; a report must say so instead.
    """
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow

    for file in sorted(directory.glob(_EVENT_GLOB)):
        if file.stat().st_size == 0:
            raise ReportError(f"{file}: empty event file")
        reader = pywrap_tensorflow.PyRecordReader_New(str(file))
        records = 0
        try:
            while True:
                try:
                    reader.GetNext()
                except errors.OutOfRangeError:
                    break
                event_pb2.Event.FromString(reader.record())
                records += 1
        except errors.DataLossError as error:
            raise ReportError(f"corrupt or truncated event file: {error.message}") from None
        except Exception as error:  # noqa: BLE001 - undecodable record
            raise ReportError(f"{file}: corrupt event file ({type(error).__name__})") from None
        if records == 0:
            raise ReportError(f"{file}: corrupt event file (no readable record)")


def load_run(name: str, directory: Path) -> Run:
    """Load one run with TensorBoard's ``EventAccumulator``.

    Args:
        name: Display name.
        directory: Directory holding the event files.

    Returns:
        The run.

    Raises:
        ReportError: For a corrupt event file or a directory without fisher-monitor data.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _check_event_files(directory)
    events = EventAccumulator(
        str(directory),
        size_guidance={"scalars": 0, "histograms": 0, "tensors": 0, "images": 1},
    )
    try:
        events.Reload()
    except Exception as error:  # noqa: BLE001
        raise ReportError(f"{directory}: cannot read event files ({error})") from None
    tags = events.Tags()
    prefixes = {
        match["prefix"]
        for tag in tags.get("scalars", [])
        if (match := _METRIC_TAG.match(tag)) and match["metric"] in METRICS
    }
    if not prefixes:
        raise NoFisherDataError(f"{directory}: no fisher-monitor data in these event files")
    prefix = sorted(prefixes, key=len)[0]
    scalars: dict[str, list[tuple[int, float]]] = {}
    for tag in tags["scalars"]:
        if tag.startswith(prefix + "/"):
            by_step = {event.step: float(event.value) for event in events.Scalars(tag)}
            scalars[tag[len(prefix) + 1 :]] = sorted(by_step.items())
    run = Run(name=name, path=directory, prefix=prefix, scalars=scalars)
    if not run.steps:
        raise ReportError(f"{directory}: fisher-monitor data without any complete measurement")
    settings_tag = f"{prefix}/settings/text_summary"
    if settings_tag in tags.get("tensors", []):
        text = events.Tensors(settings_tag)[-1].tensor_proto.string_val[0].decode("utf-8")
        run.settings, run.layer_info, run.notes = parse_settings(text)
    histogram_prefix = f"{prefix}/histograms/log10_ef_over_f/"
    for tag in tags.get("histograms", []):
        if tag.startswith(histogram_prefix):
            layer = tag[len(histogram_prefix) :]
            run.histograms[layer] = [_histogram(event) for event in events.Histograms(tag)]
    return run


def _histogram(event) -> Histogram:
    value = event.histogram_value
    limits = np.asarray(value.bucket_limit, dtype=float)
    counts = np.asarray(value.bucket, dtype=float)
    # TensorBoard stores right edges; the first bucket starts at the minimum
    edges = np.concatenate([[value.min], np.minimum(limits, value.max)])
    return Histogram(step=event.step, edges=edges, counts=counts)


def _cells(line: str) -> list[str]:
    inner = line.strip()[1:-1]  # drop the outer pipes; cells are split on unescaped ones
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", inner)]


def parse_settings(text: str) -> tuple[dict[str, str], dict[str, dict[str, str]], list[str]]:
    """Parse the callback's settings markdown: settings, layer table and notes."""
    settings: dict[str, str] = {}
    layers: dict[str, dict[str, str]] = {}
    notes: list[str] = []
    table = None
    for line in text.splitlines():
        if line.startswith("| setting |"):
            table = "settings"
            continue
        if line.startswith("| layer |"):
            table = "layers"
            continue
        if line.startswith("| ---"):
            continue
        if line.startswith("|") and table == "settings":
            cells = _cells(line)
            if len(cells) == 2:
                settings[cells[0]] = cells[1]
        elif line.startswith("|") and table == "layers":
            cells = _cells(line)
            if len(cells) >= 4:
                layers[cells[0]] = {"type": cells[1], "parameters": cells[2], "D": cells[3]}
                if len(cells) >= 6:
                    layers[cells[0]].update(backend=cells[4], status=cells[5])
        elif line.startswith("- "):
            notes.append(line[2:])
    return settings, layers, notes


def load_runs(
    paths: Iterable[str | Path], progress: Callable[[str], None] | None = None
) -> list[Run]:
    """Find and load every run under ``paths``.

    Args:
        paths: Run directories or their parents.
        progress: Called with each run's name before it is loaded.

    Returns:
        The runs, in the order found.

    Raises:
        ReportError: For bad input (see :func:`find_runs` and :func:`load_run`). A parent
            directory that holds some runs without fisher-monitor data skips those.
    """
    found = find_runs(paths)
    runs = []
    errors = []
    for name, directory in found:
        if progress is not None:
            progress(name)
        try:
            runs.append(load_run(name, directory))
        except NoFisherDataError as error:
            if len(found) == 1:
                raise
            errors.append(str(error))
    if not runs:
        raise ReportError(errors[0] if errors else "no fisher-monitor data found")
    return runs
