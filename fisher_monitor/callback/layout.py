"""The TensorBoard "Custom Scalars" layout: the monitor's main view.

TensorBoard colours a chart's lines by run, not by tag, so lines of several layers in one
chart cannot be told apart. The layout therefore gives every layer its own chart, and puts
several tags on one chart only where they share a scale and a meaning (the natural
gradient against the EF step, both cosines). Quantities of very different scale (the
projections ``gᵀF̃⁻¹g``, ``gᵀẼF⁻¹g`` and the per-sample projection) get a chart each.

Per structure (the one the verdicts use first), a category for the whole network (``all``:
one chart per metric, the direction cosine first), and one "by layer" category with one
chart per layer for each headline metric. Then the optimizer's preconditioner (when
audited) and the probe.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from fisher_monitor import keys

#: Metrics shown per layer, one chart per layer each.
LAYER_METRICS = ("direction_cosine", "rel_error", "trace_ratio", "kl")
#: Order of the whole-network charts: the headline first.
LEAD_ORDER = (
    "direction_cosine",
    "rel_error",
    "trace_ratio",
    "matrix_cosine",
    "kl",
    "nat_grad_cosine",
    "ef_grad_cosine",
    "nat_projection",
    "ef_projection",
    "ef_projection_per_sample",
    "damping",
    "dimension",
)
#: Metric pairs on one chart (same scale, one meaning).
PAIRS = {
    "F vs EF: gradient cosines": ("nat_grad_cosine", "ef_grad_cosine"),
}
#: Chart names of the metrics (the key names stay in the tags).
_TITLES = {
    "nat_projection": "nat_projection gᵀF̃⁻¹g",
    "ef_projection": "ef_projection gᵀẼF⁻¹g",
    "ef_projection_per_sample": "ef_projection_per_sample (1/N) Σ gₙᵀẼF⁻¹gₙ",
}
Chart = list  # ["Multiline", [tag regexes]]


def _tag(prefix: str, key: str) -> str:
    """An exact-match regular expression for one tag (TensorBoard anchors only the start)."""
    return re.escape(f"{prefix}/{key}") + "$"


def _chart(prefix: str, *names: str) -> Chart:
    return ["Multiline", [_tag(prefix, name) for name in names]]


def _whole_network(
    prefix: str, structure: str, dampings: Sequence[float], constant_damping: bool, audit: bool
) -> dict[str, Chart]:
    several = len(dampings) > 1
    charts: dict[str, Chart] = {}
    metrics = [m for m in LEAD_ORDER if m not in keys.CONSTANT_METRICS]
    if constant_damping:
        metrics.remove("damping")
    for damping in dampings:
        suffix = keys.damping_suffix(damping, several)
        label = f" λ={damping:g}" if several else ""

        def key(metric: str, suffix: str = suffix) -> str:
            damped = suffix if metric in keys.DAMPED_METRICS else ""
            return keys.metric_key(structure, metric, keys.ALL, damped)

        for metric in metrics:
            if metric in keys.UNDAMPED_METRICS and damping != dampings[0]:
                continue
            damped = label if metric in keys.DAMPED_METRICS else ""
            charts[f"{_TITLES.get(metric, metric)}{damped} (all)"] = _chart(prefix, key(metric))
            if metric == "direction_cosine":  # then the direction comparisons
                for title, pair in PAIRS.items():
                    charts[f"{title}{label} (all)"] = _chart(prefix, *map(key, pair))
                if audit:
                    title = f"optimizer step: cosines with −F̃⁻¹g, −ẼF⁻¹g, −g{label} (all)"
                    charts[title] = _chart(prefix, *map(key, keys.UPDATE_METRICS))
    return charts


def _by_layer(
    prefix: str, structure: str, suffix: str, layers: Sequence[str], audit: bool
) -> dict[str, Chart]:
    metrics = [*LAYER_METRICS, *(("update_nat_cosine",) if audit else ())]
    charts: dict[str, Chart] = {}
    for metric in metrics:
        name = suffix if metric in keys.DAMPED_METRICS else ""
        for layer in layers:
            charts[f"{metric} · {layer}"] = _chart(
                prefix, keys.metric_key(structure, metric, layer, name)
            )
    return charts


def custom_scalar_layout(
    prefix: str,
    structures: Sequence[str],
    dampings: Sequence[float],
    layers: Sequence[str],
    constant_damping: bool = False,
    audit: bool = False,
    preconditioner: bool = False,
) -> dict[str, dict[str, Chart]]:
    """The layout for ``SummaryWriter.add_custom_scalars``.

    Args:
        prefix: The logging prefix.
        structures: Measured structures.
        dampings: Damping values (several: charts per value for the damped metrics; the
            per-layer charts use the first).
        layers: Measured layer names, forward order.
        constant_damping: Whether λ is constant (absolute damping): no ``damping`` chart.
        audit: Whether the optimizer's step is audited (``update_*_cosine`` keys).
        preconditioner: Whether the optimizer's preconditioner is audited.

    Returns:
        Category title → chart title → ``["Multiline", [tag regex, …]]``.
    """
    layout: dict[str, dict[str, Chart]] = {}
    first = keys.damping_suffix(dampings[0], len(dampings) > 1)
    primary = keys.primary_structure(structures)
    for structure in sorted(structures, key=lambda s: s != primary):  # the verdicts' first
        layout[f"{prefix}: {structure}"] = _whole_network(
            prefix, structure, dampings, constant_damping, audit
        )
        layout[f"{prefix}: {structure} by layer"] = _by_layer(
            prefix, structure, first, layers, audit
        )
    if preconditioner:
        pair = keys.OPTIMIZER_METRICS
        layout[f"{prefix}: optimizer preconditioner"] = {
            f"cosine with √diag F, √diag EF · {layer}": _chart(
                prefix, *(keys.optimizer_key(metric, layer) for metric in pair)
            )
            for layer in [keys.ALL, *layers]
        }
    layout[f"{prefix}: probe"] = {
        "loss": _chart(prefix, keys.probe_key("loss")),
        "gradient norm": _chart(prefix, keys.probe_key("grad_norm")),
        "seconds per measurement": _chart(prefix, keys.probe_key("seconds")),
        "monitor's share of the fit's time": _chart(prefix, keys.probe_key("overhead")),
        "probe samples": _chart(prefix, keys.probe_key("batch_size")),
    }
    return layout
