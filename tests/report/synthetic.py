"""Synthetic fisher-monitor runs written with TensorBoard's own event writer (no training).

Each scalar is its own event, as Lightning's ``TensorBoardLogger`` writes them; the
run-information file is written with :func:`fisher_monitor.runinfo.write`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from fisher_monitor import keys, runinfo

PREFIX = "fisher"
#: A layer name that is HTML, as user code can make it.
HOSTILE_LAYER = "<script>alert(1)</script>"


def scalar_event(tag: str, step: int, value: float) -> event_pb2.Event:
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
    return event_pb2.Event(step=step, wall_time=1.7e9 + step, summary=summary)


def histogram_event(tag: str, step: int, values: np.ndarray, bins: int = 16) -> event_pb2.Event:
    counts, edges = np.histogram(values, bins=bins)
    histogram = summary_pb2.HistogramProto(
        min=float(values.min()),
        max=float(values.max()),
        num=float(values.size),
        sum=float(values.sum()),
        sum_squares=float(values @ values),
        bucket_limit=edges[1:].tolist(),
        bucket=counts.astype(float).tolist(),
    )
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, histo=histogram)])
    return event_pb2.Event(step=step, wall_time=1.7e9 + step, summary=summary)


def write_events(directory: Path, events: Iterable[event_pb2.Event], suffix: str = "") -> Path:
    """Write ``events`` into one new event file of ``directory``; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    before = set(directory.glob("events.out.tfevents.*"))
    writer = EventFileWriter(str(directory), filename_suffix=suffix)
    for event in events:
        writer.add_event(event)
    writer.close()
    (path,) = set(directory.glob("events.out.tfevents.*")) - before
    return path


def metric_events(
    values: Mapping[str, Sequence[float]],
    steps: Sequence[int],
    prefix: str = PREFIX,
) -> list[event_pb2.Event]:
    """One event per (key, step): ``values[key][i]`` at ``steps[i]`` (NaN: not logged)."""
    events = []
    for index, step in enumerate(steps):
        for key, series in values.items():
            if not np.isnan(series[index]):
                events.append(scalar_event(f"{prefix}/{key}", step, float(series[index])))
    return events


def fisher_run(
    directory: Path,
    layers: Sequence[str] = ("fc1", "fc2"),
    steps: Sequence[int] = (0, 10, 20, 30, 40, 50),
    values: Mapping[str, Sequence[float]] | None = None,
    structure: str = "block",
    info: Mapping | None = None,
    histograms: bool = False,
    seed: int = 0,
    prefix: str = PREFIX,
) -> Path:
    """A complete run: every metric of ``structure`` per layer and ``all``, probe scalars.

    Args:
        directory: Run directory (created).
        layers: Layer names.
        steps: Measured steps.
        values: Keys (without prefix) whose series replace the random ones.
        structure: The structure logged.
        info: Run-information data (``prefix`` is filled in); ``None`` writes none.
        histograms: Also log a histogram of log10(EF_ii/F_ii) per layer and step.
        seed: Random seed of the filler values.
        prefix: Logging prefix.

    Returns:
        ``directory``.
    """
    rng = np.random.default_rng(seed)
    series: dict[str, Sequence[float]] = {}
    for metric in keys.METRICS:
        if metric in keys.CONSTANT_METRICS:
            continue
        for layer in [*layers, keys.ALL]:
            low, high = (0.0, 1.0) if metric in keys.COSINE_METRICS else (0.5, 2.0)
            series[keys.metric_key(structure, metric, layer)] = rng.uniform(low, high, len(steps))
    series[keys.probe_key("loss")] = rng.uniform(0.5, 1.0, len(steps))
    series[keys.probe_key("batch_size")] = np.full(len(steps), 64.0)
    series.update(values or {})
    events = metric_events(series, steps, prefix)
    if histograms:
        for step in steps:
            for layer in layers:
                tag = f"{prefix}/histograms/log10_ef_over_f/{layer}"
                events.append(histogram_event(tag, step, rng.normal(0, 1, 200)))
    write_events(directory, events)
    if info is not None:
        runinfo.write(directory, {"prefix": prefix, **info})
    return directory


def layer_entries(layers: Sequence[str], dimension: int = 10) -> list[dict]:
    """Run-information ``layers`` entries."""
    return [
        {
            "layer": name,
            "type": "Linear",
            "parameters": [f"{name}.weight", f"{name}.bias"],
            "dimension": dimension,
            "backend": "backpack",
            "measured": True,
            "reason": None,
        }
        for name in layers
    ]
