"""The report's data model: a :class:`Run` and its scalars, read from any logger's files.

A run holds what fisher-monitor logged for one fit under one prefix: the scalars per key
(steps and values), the settings, layers and notes of the run-information file where one
was written, and the histograms TensorBoard keeps. Loading is done by the readers of
each format (:mod:`~fisher_monitor.report.tensorboard_logs`,
:mod:`~fisher_monitor.report.csvlogs`, :mod:`~fisher_monitor.report.mlflowlogs`,
dispatched by :func:`fisher_monitor.report.load.load_runs`). Nothing here needs torch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from fisher_monitor import keys
from fisher_monitor.report.events import (
    HistogramSeries,
)

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


__all__ = ["HISTOGRAM_GROUP", "NoFisherDataError", "ReportError", "Run"]
