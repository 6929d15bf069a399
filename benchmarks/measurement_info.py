"""What a measurement says about itself, for the tables of ``make bench``.

:func:`describe` reads a ``Measurement``: the probe batch it used and whether it was
sub-sampled, the backend of each layer, its notes (grouped), the cost model's estimate
and the largest relative standard error of its Monte-Carlo estimates.
"""

from __future__ import annotations

import math


def grouped_notes(notes: list[str], most: int = 6) -> list[str]:
    """Notes with the same text after a layer name (``"bn1: BatchNorm …"``) counted once."""
    groups: dict[str, list[str]] = {}
    for note in notes:
        layer, separator, text = note.partition(": ")
        single = bool(separator) and " " not in layer
        groups.setdefault(text if single else note, []).append(layer if single else "")
    lines = []
    for text, layers in groups.items():
        named = [layer for layer in layers if layer]
        if len(named) > 1:
            text = f"{len(named)} layers ({named[0]}, …): {text}"
        elif named:
            text = f"{named[0]}: {text}"
        lines.append(text if len(text) <= 300 else text[:299] + "…")
    return lines[:most]


def headline_and_backends(measurement) -> dict:
    """The headline metrics missing at ``all``, the layers per backend, the solves' record."""
    from fisher_monitor import keys

    estimator = (getattr(measurement, "settings", None) or {}).get("estimator") or {}
    headline = ("direction_cosine", "nat_grad_cosine", "kl", "nat_projection")
    structures = {str(s) for s in getattr(measurement, "structures", ())}
    missing = [
        f"{structure}/{metric}"
        for structure in sorted(structures & {"diag", "block"})
        for metric in headline
        if keys.metric_key(structure, metric, "all") not in measurement.scalars
    ]
    per_layer: dict[str, list[str]] = {}
    for row in measurement.coverage:
        backend = str(row.get("backend")) if row.get("measured") else "not measured"
        per_layer.setdefault(backend, []).append(str(row.get("layer")))
    return {
        "headline_missing": missing,
        "layer_backends": per_layer,
        "exact_solves": estimator.get("exact_solves"),
    }


def describe(measurement, batch_size: int) -> dict:
    """What a measurement says about itself: probe size, backends, notes, standard errors."""
    from fisher_monitor import keys

    scalars = measurement.scalars
    probe = scalars.get(keys.probe_key("batch_size"))
    notes = [str(note) for note in measurement.notes]
    subsampled = (probe is not None and probe < batch_size) or any(
        "sub-sampled" in note or "retried with" in note for note in notes
    )
    backends = sorted(
        {str(row.get("backend")) for row in measurement.coverage if row.get("measured")}
    )
    unmeasured = [row.get("layer") for row in measurement.coverage if not row.get("measured")]
    worst, worst_key, estimates = 0.0, None, 0
    worst_all, worst_all_key = 0.0, None  # the whole network's keys only
    for key, value in scalars.items():
        parsed = keys.parse_key(key)
        if parsed is None or not parsed.stderr:
            continue
        estimates += 1
        suffix = f"@{parsed.damping}" if parsed.damping else ""
        estimate = scalars.get(
            keys.metric_key(parsed.structure, parsed.metric, parsed.layer, suffix)
        )
        if estimate is None:
            continue
        relative = abs(value) / abs(estimate) if estimate else float("inf")
        if math.isnan(relative):  # a nan estimate (e.g. a vanished gradient's cosine)
            continue
        if relative > worst or worst_key is None:
            worst, worst_key = relative, key
        if parsed.layer == "all" and (relative > worst_all or worst_all_key is None):
            worst_all, worst_all_key = relative, key
    cost = (getattr(measurement, "settings", None) or {}).get("cost") or {}
    return {
        **headline_and_backends(measurement),
        "cost_steps": cost.get("steps"),
        "cost_seconds": cost.get("seconds"),
        "probe_batch_size": probe,
        "subsampled": subsampled,
        "backends": backends,
        "unmeasured_layers": unmeasured,
        "notes": grouped_notes(notes),
        "estimates": estimates,
        "worst_relative_se": worst if estimates else None,
        "worst_se_key": worst_key,
        "worst_all_relative_se": worst_all if worst_all_key is not None else None,
        "worst_all_se_key": worst_all_key,
    }
