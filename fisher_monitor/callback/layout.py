"""The TensorBoard "Custom Scalars" layout: the monitor's main view.

TensorBoard colours a chart's lines by run, not by tag, so two tags in one chart cannot
be told apart; every chart therefore shows **one tag**. TensorBoard's default (fast) data
loader serves no tag descriptions, so the chart titles carry the meaning: what the number
compares, and the report's thresholds ("≥ 0.9 agree, < 0.5 disagree").

The layout opens with an **overview** of at most four charts (whole network): the
direction cosine, the relative error, the trace ratio and, when the optimizer is audited,
its step against the natural gradient (else the KL). Each is taken from the first
structure (block, kron, diag) that logged it — a sketched block Fisher logs no direction
cosine, so the overview shows the diagonal's. Then, per structure (the verdicts' first),
one chart per whole-network metric and a "by layer" category with one chart per layer for
each headline metric; then the optimizer's preconditioner (when audited) and the probe.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

from fisher_monitor import keys
from fisher_monitor.report.thresholds import (
    AGREE_COSINE,
    DISAGREE_COSINE,
    REL_ERROR_CLOSE,
    REL_ERROR_LIMIT,
    STEP_COSINE,
    TRACE_RATIO_RANGE,
)

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
#: What each metric compares, in the chart titles (one notation: F̃ = F + λI, ẼF = EF + λI).
MEANINGS = {
    "direction_cosine": "EF step vs natural gradient, cos(F̃⁻¹g, ẼF⁻¹g)",
    "rel_error": "EF vs F as matrices, ‖EF − F‖ / ‖F‖",
    "trace_ratio": "curvature scale, tr EF / tr F",
    "matrix_cosine": "shape of EF vs F, ⟨EF, F⟩ / (‖EF‖ ‖F‖)",
    "kl": "Laplace approximations, KL in nats",
    "nat_grad_cosine": "natural gradient vs gradient, cos(g, F̃⁻¹g)",
    "ef_grad_cosine": "EF step vs gradient, cos(g, ẼF⁻¹g)",
    "nat_projection": "gᵀF̃⁻¹g",
    "ef_projection": "gᵀẼF⁻¹g, at most 1 per layer",
    "ef_projection_per_sample": "(1/N) Σ gₙᵀẼF⁻¹gₙ, effective rank of EF",
    "damping": "λ",
    "update_nat_cosine": "your optimizer's step vs natural gradient, cos(Δθ, −F̃⁻¹g)",
    "update_ef_cosine": "your optimizer's step vs EF step, cos(Δθ, −ẼF⁻¹g)",
    "update_grad_cosine": "your optimizer's step vs gradient step, cos(Δθ, −g)",
    "preconditioner_fisher_cosine": "optimizer's preconditioner vs √diag F",
    "preconditioner_ef_cosine": "optimizer's preconditioner vs √diag EF",
}
#: The report's thresholds, as the chart titles state them.
THRESHOLD_TEXT = {
    "direction_cosine": f"1 same; ≥ {AGREE_COSINE} agree, < {DISAGREE_COSINE} disagree",
    "rel_error": f"0 same; ≤ {REL_ERROR_CLOSE} close, > {REL_ERROR_LIMIT} differ",
    "trace_ratio": f"1 same; outside [{TRACE_RATIO_RANGE[0]}, {TRACE_RATIO_RANGE[1]:g}] off",
    "matrix_cosine": "1 same shape",
    "kl": "0 same",
    "update_nat_cosine": f"≥ {STEP_COSINE} within 60°",
    "preconditioner_fisher_cosine": "compare with the √diag EF chart",
    "preconditioner_ef_cosine": "compare with the √diag F chart",
}
#: The overview's charts, in order; the fourth is the optimizer's step when audited.
OVERVIEW = ("direction_cosine", "rel_error", "trace_ratio")
Chart = list  # ["Multiline", [tag regexes]]


def _tag(prefix: str, key: str) -> str:
    """An exact-match regular expression for one tag (TensorBoard anchors only the start)."""
    return re.escape(f"{prefix}/{key}") + "$"


def _chart(prefix: str, key: str) -> Chart:
    return ["Multiline", [_tag(prefix, key)]]


def chart_title(metric: str, where: str) -> str:
    """``"direction_cosine (block, all): EF step vs natural gradient, …; 1 same; ≥ 0.9 …"``."""
    meaning = MEANINGS.get(metric)
    limits = THRESHOLD_TEXT.get(metric)
    text = f"{metric} ({where})"
    if meaning:
        text += f": {meaning}"
    if limits:
        text += f"; {limits}"
    return text


def _first_logged(
    metric: str, structures: Sequence[str], suffix: str, logged: Collection[str] | None
) -> str:
    """The first structure (block, kron, diag) whose whole-network ``metric`` was logged."""
    ordered = [s for s in keys.PRIMARY_ORDER if s in structures]
    damped = suffix if metric in keys.DAMPED_METRICS else ""
    for structure in ordered:
        if logged is None or keys.metric_key(structure, metric, keys.ALL, damped) in logged:
            return structure
    return ordered[0]


def _overview(
    prefix: str,
    structures: Sequence[str],
    suffix: str,
    audit: bool,
    logged: Collection[str] | None,
) -> dict[str, Chart]:
    charts: dict[str, Chart] = {}
    last = "update_nat_cosine" if audit else "kl"
    for metric in (*OVERVIEW, last):
        structure = _first_logged(
            "direction_cosine" if metric == "update_nat_cosine" else metric,
            structures,
            suffix,
            logged,
        )
        damped = suffix if metric in keys.DAMPED_METRICS else ""
        key = keys.metric_key(structure, metric, keys.ALL, damped)
        charts[chart_title(metric, f"{structure}, all")] = _chart(prefix, key)
    return charts


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
        for metric in metrics + (list(keys.UPDATE_METRICS) if audit else []):
            if metric in keys.UNDAMPED_METRICS and damping != dampings[0]:
                continue
            damped = suffix if metric in keys.DAMPED_METRICS else ""
            where = f"all{label if metric in keys.DAMPED_METRICS else ''}"
            key = keys.metric_key(structure, metric, keys.ALL, damped)
            charts[chart_title(metric, where)] = _chart(prefix, key)
    return charts


def _by_layer(
    prefix: str, structure: str, suffix: str, layers: Sequence[str], audit: bool
) -> dict[str, Chart]:
    metrics = [*LAYER_METRICS, *(("update_nat_cosine",) if audit else ())]
    charts: dict[str, Chart] = {}
    for metric in metrics:
        name = suffix if metric in keys.DAMPED_METRICS else ""
        limits = THRESHOLD_TEXT.get(metric)
        for layer in layers:
            title = f"{metric} · {layer}" + (f" ({limits})" if limits else "")
            charts[title] = _chart(prefix, keys.metric_key(structure, metric, layer, name))
    return charts


def custom_scalar_layout(
    prefix: str,
    structures: Sequence[str],
    dampings: Sequence[float],
    layers: Sequence[str],
    constant_damping: bool = False,
    audit: bool = False,
    preconditioner: bool = False,
    logged: Collection[str] | None = None,
) -> dict[str, dict[str, Chart]]:
    """The layout for ``SummaryWriter.add_custom_scalars``.

    Args:
        prefix: The logging prefix.
        structures: Measured structures.
        dampings: Damping values (several: charts per value for the damped metrics; the
            overview and the per-layer charts use the first).
        layers: Measured layer names, forward order.
        constant_damping: Whether λ is constant (absolute damping): no ``damping`` chart.
        audit: Whether the optimizer's step is audited (``update_*_cosine`` keys).
        preconditioner: Whether the optimizer's preconditioner is audited.
        logged: Keys (without the prefix) of a first measurement, to take each overview
            chart from a structure that logs its metric; ``None``: the primary structure.

    Returns:
        Category title → chart title → ``["Multiline", [tag regex]]``, the overview first.
    """
    first = keys.damping_suffix(dampings[0], len(dampings) > 1)
    primary = keys.primary_structure(structures)
    layout: dict[str, dict[str, Chart]] = {
        f"{prefix}: overview (whole network; with few points set Smoothing to 0)": _overview(
            prefix, structures, first, audit, logged
        )
    }
    for structure in sorted(structures, key=lambda s: s != primary):  # the verdicts' first
        layout[f"{prefix}: {structure}"] = _whole_network(
            prefix, structure, dampings, constant_damping, audit
        )
        layout[f"{prefix}: {structure} by layer"] = _by_layer(
            prefix, structure, first, layers, audit
        )
    if preconditioner:
        layout[f"{prefix}: optimizer preconditioner"] = {
            chart_title(metric, layer): _chart(prefix, keys.optimizer_key(metric, layer))
            for layer in [keys.ALL, *layers]
            for metric in keys.OPTIMIZER_METRICS
        }
    layout[f"{prefix}: probe"] = {
        "loss of the probe batch": _chart(prefix, keys.probe_key("loss")),
        "gradient norm ‖g‖": _chart(prefix, keys.probe_key("grad_norm")),
        "seconds per measurement": _chart(prefix, keys.probe_key("seconds")),
        "monitor's share of the fit's time": _chart(prefix, keys.probe_key("overhead")),
        "probe samples": _chart(prefix, keys.probe_key("batch_size")),
    }
    return layout
