"""Report runs from what a logger other than TensorBoard kept: scalars and hyperparameters.

Shared by :mod:`fisher_monitor.report.csvlogs` and :mod:`fisher_monitor.report.mlflowlogs`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fisher_monitor import keys, runinfo
from fisher_monitor.report.runs import NoFisherDataError, ReportError, Run


def prefixes(tags: Iterable[str]) -> dict[str, str]:
    """Per fisher-monitor tag, its logging prefix (the shortest that leaves a metric key)."""
    found = {}
    for tag in tags:
        position = tag.find("/")
        while position > 0:
            rest = tag[position + 1 :]
            if keys.parse_key(rest) is not None:
                found[tag] = tag[:position]
                break
            position = tag.find("/", position + 1)
    for tag in tags:  # probe/… keys under a prefix found above
        head, _, rest = tag.rpartition("/" + keys.PROBE + "/")
        if rest and head in found.values():
            found[tag] = head
    return found


def plain_value(text: Any) -> Any:
    """A hyperparameter as logged back to Python: bools, ``None``, numbers, else the text."""
    if not isinstance(text, str):
        return text
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null", ""):
        return None
    try:
        number = float(text)
    except ValueError:
        return text.strip()
    return int(number) if number.is_integer() and "." not in text and "e" not in lowered else number


def settings_from_hyperparameters(
    hyperparameters: Mapping[str, Any], prefix: str
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The callback's settings and layer dimensions from its ``{prefix}/…`` hyperparameters.

    Lists, logged as comma-separated text (``"diag, block"``), become lists again for the
    settings that are lists (``structures``, several ``damping`` values).

    Returns:
        ``(settings, layer_info)``: settings as the run file holds them, and per layer
        ``{"layer": name, "dimension": D}`` (``all`` left out).
    """
    head = prefix + "/"
    settings: dict[str, Any] = {}
    layers: dict[str, dict[str, Any]] = {}
    for name, value in hyperparameters.items():
        if not str(name).startswith(head):
            continue
        key = str(name)[len(head) :]
        if key.startswith("dimension/"):
            layer = key[len("dimension/") :]
            if layer != keys.ALL and isinstance(plain_value(value), (int, float)):
                layers[layer] = {"layer": layer, "dimension": plain_value(value)}
            continue
        settings[key] = plain_value(value)
    if isinstance(settings.get("structures"), str):
        settings["structures"] = [s.strip() for s in settings["structures"].split(",")]
    damping = settings.get("damping")
    if isinstance(damping, str) and "," in damping:
        settings["damping"] = [plain_value(part) for part in damping.split(",")]
    return settings, layers


def make_runs(
    name: str,
    directory: Path,
    scalars: Mapping[str, list[tuple[int, float]]],
    hyperparameters: Mapping[str, Any],
    read_notes: Sequence[str] = (),
) -> list[Run]:
    """One run per logging prefix found among ``scalars`` (tags with their prefix).

    Raises:
        NoFisherDataError: When no tag is fisher-monitor's.
        ReportError: For fisher-monitor data without any complete measurement.
    """
    by_tag = prefixes(scalars)
    found = sorted(set(by_tag.values()))
    if not found:
        raise NoFisherDataError(f"{directory}: no fisher-monitor data in these logs")
    stored = runinfo.read(directory)
    runs = []
    for prefix in found:
        head = prefix + "/"
        series = {
            tag[len(head) :]: sorted(values)
            for tag, values in scalars.items()
            if by_tag.get(tag) == prefix and values
        }
        settings, layers = settings_from_hyperparameters(hyperparameters, prefix)
        info = stored.get(prefix, {})
        run = Run(
            name=name if len(found) == 1 else f"{name} [{prefix}]",
            path=directory,
            prefix=prefix,
            scalars=series,
            settings=dict(info.get("settings") or settings),
            layer_info={
                str(entry["layer"]): dict(entry)
                for entry in info.get("layers") or []
                if isinstance(entry, dict) and "layer" in entry
            }
            or layers,
            notes=[str(note) for note in info.get("notes") or []],
            fit=dict(info.get("fit") or {}),
            read_notes=list(read_notes),
        )
        if not run.structures:
            continue
        if not run.steps:
            raise ReportError(f"{directory}: fisher-monitor data without any complete measurement")
        runs.append(run)
    if not runs:
        raise NoFisherDataError(f"{directory}: no fisher-monitor data in these logs")
    return runs


__all__ = ["make_runs", "plain_value", "prefixes", "settings_from_hyperparameters"]
