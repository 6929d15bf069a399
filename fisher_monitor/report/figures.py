"""Figures of a report, drawn from the logs only (matplotlib, no global pyplot state).

Readable with many layers: with more than :data:`HIGHLIGHT_ALL` layers, only the layers
with the lowest and highest median direction cosine are coloured and named; the others
are thin grey lines. Legends sit outside the axes, never on the data; log axes get
labelled ticks whatever their range.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from fisher_monitor import keys
from fisher_monitor.report.plotting import draw_cosine_heatmap, plain_text
from fisher_monitor.report.runs import Run
from fisher_monitor.report.thresholds import AGREE_COSINE, DISAGREE_COSINE, STEP_COSINE
from fisher_monitor.report.verdict import layer_medians

WIDTH = 10.0  # inches at 100 dpi: readable on a laptop screen
#: Up to this many layers, every layer gets its own colour and legend entry.
HIGHLIGHT_ALL = 8
#: With more layers: this many lowest and highest (median direction cosine) are coloured.
WORST_SHOWN, BEST_SHOWN = 3, 2
#: Markers on lines only up to this many points.
MARKERS_UP_TO = 60
_GREY = "#b0b0b0"
_WORST_COLORS = ("#d62728", "#ff7f0e", "#9467bd")
_BEST_COLORS = ("#2ca02c", "#17becf")


def png(figure: Figure) -> bytes:
    """Render a figure to PNG bytes (training steps on x axes as whole numbers)."""
    for ax in figure.axes:
        if ax.get_xlabel() == "training step" and not ax.get_images():
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def _grid(count: int, height: float) -> tuple[Figure, list]:
    """A figure with ``count`` axes stacked vertically."""
    figure = Figure(figsize=(WIDTH, height * count), dpi=100, layout="constrained")
    return figure, list(figure.subplots(count, 1, squeeze=False)[:, 0])


def _title(run: Run, several: bool, text: str) -> str:
    return plain_text(f"{run.name}: {text}" if several else text)


def _marker(steps: np.ndarray) -> str | None:
    return "." if len(steps) <= MARKERS_UP_TO else None


def _legend_outside(ax, **kwargs) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(
            handles,
            labels,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            borderaxespad=0.0,
            fontsize="small",
            frameon=False,
            **kwargs,
        )


def log_axis(ax, values: Sequence[float] | np.ndarray, axis: str = "y") -> bool:
    """Put ``axis`` on a log scale with labelled ticks when the positive values span > 3×.

    Under about two decades the ticks are at 1, 2 and 5 times powers of ten, labelled
    as plain numbers; over that, at powers of ten, labelled ``10^k``.

    Returns:
        Whether the axis is logarithmic.
    """
    values = np.asarray(values, dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    if (
        not len(positive)
        or positive.max() / positive.min() <= 3
        or len(positive) < len(values[np.isfinite(values)])
    ):
        return False
    target = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    decades = np.log10(positive.max() / positive.min())
    if decades < 2.2:
        subs = (1.0, 2.0, 3.0, 5.0) if decades < 1 else (1.0, 2.0, 5.0)
        target.set_major_locator(LogLocator(base=10, subs=subs))
        target.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        target.set_minor_formatter(NullFormatter())
    else:
        target.set_major_locator(LogLocator(base=10, numticks=12))
    return True


def highlighted_layers(run: Run) -> dict[str, str]:
    """Layers drawn in colour, with their colour: all of them when few, else worst and best.

    The order is the legend's: worst first.
    """
    medians = layer_medians(run)
    ranked = sorted(medians, key=medians.get)
    if len(run.layers) <= HIGHLIGHT_ALL:
        from matplotlib import colormaps

        palette = colormaps["tab10"]
        return {layer: palette(i % 10) for i, layer in enumerate(run.layers)}
    chosen = {}
    for layer, color in zip(ranked[:WORST_SHOWN], _WORST_COLORS, strict=False):
        chosen[layer] = color
    best = [layer for layer in ranked[::-1] if layer not in chosen][:BEST_SHOWN]
    for layer, color in zip(best, _BEST_COLORS, strict=False):
        chosen[layer] = color
    return chosen


def _layer_label(run: Run, layer: str, medians: dict[str, float], many: bool) -> str:
    name = plain_text(layer)
    if not many or layer not in medians:
        return name
    ranked = sorted(medians, key=medians.get)
    kind = "worst" if ranked.index(layer) < WORST_SHOWN else "best"
    return f"{name} ({kind}, median cos {medians[layer]:.2f})"


def _layer_lines(ax, run: Run, metric: str) -> list[float]:
    """Per-layer lines of ``metric`` (highlighted ones coloured, the rest grey) and ``all``."""
    chosen = highlighted_layers(run)
    many = len(run.layers) > HIGHLIGHT_ALL
    medians = layer_medians(run) if many else {}
    values_seen: list[float] = []
    grey_labelled = False
    for layer in run.layers:
        if layer in chosen:
            continue
        steps, values = run.series(run.key(metric, layer))
        label = None
        if not grey_labelled:
            label = f"other {len(run.layers) - len(chosen)} layers"
            grey_labelled = True
        ax.plot(steps, values, color=_GREY, linewidth=0.7, alpha=0.7, label=label, zorder=1)
        values_seen += values.tolist()
    for layer, color in chosen.items():
        steps, values = run.series(run.key(metric, layer))
        ax.plot(
            steps,
            values,
            color=color,
            linewidth=1.4,
            marker=_marker(steps),
            label=_layer_label(run, layer, medians, many),
            zorder=2,
        )
        values_seen += values.tolist()
    steps, values = run.series(run.key(metric))
    ax.plot(steps, values, color="black", linewidth=2.5, label="all layers", zorder=3)
    values_seen += values.tolist()
    return values_seen


def direction_cosine(runs: Sequence[Run]) -> Figure:
    """cos(natural gradient, EF direction) over steps: layers, and ``all`` in bold."""
    figure, axes = _grid(len(runs), 3.4)
    for run, ax in zip(runs, axes, strict=True):
        _layer_lines(ax, run, "direction_cosine")
        ax.axhline(AGREE_COSINE, color="green", linestyle=":", linewidth=1, label="agree ≥ 0.9")
        ax.axhline(DISAGREE_COSINE, color="red", linestyle=":", linewidth=1, label="disagree < 0.5")
        ax.set_ylim(-1.05, 1.05)
        ax.set_xlabel("training step")
        ax.set_ylabel("direction cosine")
        ax.set_title(_title(run, len(runs) > 1, f"{run.primary_structure}: cos(F̃⁻¹g, ẼF⁻¹g)"))
        _legend_outside(ax)
    return figure


def trace_ratio_and_kl(runs: Sequence[Run]) -> Figure:
    """Whole-network trace ratio and KL divergence over steps, runs overlaid."""
    figure = Figure(figsize=(WIDTH, 3.6), dpi=100, layout="constrained")
    left, right = figure.subplots(1, 2)
    ratios_seen, kls_seen = [], []
    for run in runs:
        steps, ratios = run.series(run.key("trace_ratio"))
        label = plain_text(run.name)
        left.plot(steps, ratios, marker=_marker(steps), label=label)
        ratios_seen += ratios.tolist()
        steps, kls = run.series(run.key("kl"))
        right.plot(steps, kls, marker=_marker(steps), label=label)
        kls_seen += kls.tolist()
    left.axhline(1.0, color="gray", linestyle=":")
    log_axis(left, [*ratios_seen, 1.0])
    log_axis(right, kls_seen)
    left.set_title("tr EF / tr F (whole network)")
    right.set_title("KL(Laplace with F ‖ Laplace with EF), nats")
    for ax in (left, right):
        ax.set_xlabel("training step")
    if len(runs) > 1:
        handles, labels = left.get_legend_handles_labels()
        figure.legend(handles, labels, loc="outside lower center", ncols=min(len(runs), 3))
    return figure


def relative_error(runs: Sequence[Run]) -> Figure:
    """‖EF − F‖/‖F‖ per layer and for the whole network, over steps."""
    figure, axes = _grid(len(runs), 3.2)
    for run, ax in zip(runs, axes, strict=True):
        seen = _layer_lines(ax, run, "rel_error")
        log_axis(ax, seen)
        ax.set_xlabel("training step")
        ax.set_ylabel("relative error")
        ax.set_title(_title(run, len(runs) > 1, "‖EF − F‖_F / ‖F‖_F"))
        _legend_outside(ax)
    return figure


def projections(runs: Sequence[Run]) -> Figure:
    """gᵀF̃⁻¹g and gᵀẼF⁻¹g of the whole network (sums over layers), with their bounds."""
    figure, axes = _grid(len(runs), 3.2)
    for run, ax in zip(runs, axes, strict=True):
        seen = []
        for metric, label, style in (
            ("nat_projection", "gᵀF̃⁻¹g (sum over layers)", "-"),
            ("ef_projection", "gᵀẼF⁻¹g (sum over layers)", "-"),
            ("ef_projection_per_sample", "(1/N) Σ gₙᵀẼF⁻¹gₙ (sum over layers)", "--"),
        ):
            steps, values = run.series(run.key(metric))
            ax.plot(steps, values, linestyle=style, marker=_marker(steps), label=label)
            seen += values.tolist()
        layers = len(run.layers) or 1
        ax.axhline(
            layers,
            color="gray",
            linestyle=":",
            label=f"{layers} layers: bound of gᵀẼF⁻¹g (≤ 1 per layer)",
        )
        seen.append(layers)
        dimension = run.dimensions.get(keys.ALL)
        if dimension:
            ax.axhline(dimension, color="black", linestyle=":", label=f"D = {dimension:,.0f}")
            seen.append(dimension)
        log_axis(ax, seen)
        ax.set_xlabel("training step")
        ax.set_title(
            _title(run, len(runs) > 1, "projections of the gradient, whole network ('all')")
        )
        _legend_outside(ax)
    return figure


def heatmap(run: Run) -> Figure:
    """Layers × steps heat map of the direction cosine."""
    layers = [*run.layers, keys.ALL]
    steps = run.steps
    grid = np.full((len(layers), len(steps)), np.nan)
    positions = np.asarray(steps)
    for i, layer in enumerate(layers):
        layer_steps, values = run.series(run.key("direction_cosine", layer))
        index = np.searchsorted(positions, layer_steps)
        valid = (index < len(positions)) & (
            positions[np.minimum(index, len(steps) - 1)] == layer_steps
        )
        grid[i, index[valid]] = values[valid]
    row = 0.35 if len(layers) <= 30 else 0.2
    height = max(3.2, 1.4 + row * len(layers))
    figure = Figure(figsize=(WIDTH, height), dpi=100, layout="constrained")
    draw_cosine_heatmap(
        figure,
        steps,
        layers,
        grid,
        f"{run.name}: direction cosine per layer ({run.primary_structure})",
    )
    return figure


def chosen_steps(steps: Sequence[int]) -> list[int]:
    """First, middle and last step (without repeats)."""
    if not len(steps):
        return []
    picks = [steps[0], steps[len(steps) // 2], steps[-1]]
    return sorted({int(step) for step in picks})


def log_ratio_distribution(run: Run) -> Figure | None:
    """Distribution of log10(EF_ii / F_ii) per layer at the first, middle and last step."""
    if not run.histograms:
        return None
    all_steps = sorted({int(s) for series in run.histograms.values() for s in series.steps})
    steps = chosen_steps(all_steps)
    chosen = highlighted_layers(run)
    many = len(run.layers) > HIGHLIGHT_ALL
    medians = layer_medians(run) if many else {}
    figure = Figure(figsize=(WIDTH, 3.4), dpi=100, layout="constrained")
    axes = figure.subplots(1, len(steps), squeeze=False)[0]
    for ax, step in zip(axes, steps, strict=True):
        grey_labelled = False
        for layer in [layer for layer in run.layers if layer not in chosen] + list(chosen):
            series = run.histograms.get(layer)
            found = series.at(step) if series is not None else None
            if found is None or not found[1].sum():
                continue
            edges, counts = found
            if layer in chosen:
                ax.stairs(
                    counts / counts.sum(),
                    edges,
                    color=chosen[layer],
                    linewidth=1.4,
                    label=_layer_label(run, layer, medians, many),
                )
            else:
                label = None if grey_labelled else "other layers"
                grey_labelled = True
                ax.stairs(counts / counts.sum(), edges, color=_GREY, linewidth=0.7, label=label)
        ax.axvline(0.0, color="gray", linestyle=":")
        ax.set_xlabel("log10(EF_ii / F_ii)")
        ax.set_title(f"step {step}")
    axes[0].set_ylabel("share of parameters")
    handles, labels = axes[-1].get_legend_handles_labels()
    if handles:
        figure.legend(
            handles, labels, loc="outside lower center", ncols=3, fontsize="small", frameon=False
        )
    figure.suptitle(plain_text(f"{run.name}: diagonal entries, EF against F"))
    return figure


def optimizer_audit(run: Run) -> Figure | None:
    """The optimizer's step against −F̃⁻¹g, −ẼF⁻¹g and −g; its preconditioner against F, EF."""
    if not run.has_update_audit:
        return None
    preconditioner = [
        (metric, label)
        for metric, label in (
            ("preconditioner_ef_cosine", "with √diag EF"),
            ("preconditioner_fisher_cosine", "with √diag F"),
        )
        if len(run.series(keys.optimizer_key(metric, keys.ALL))[0])
    ]
    figure = Figure(figsize=(WIDTH, 3.6), dpi=100, layout="constrained")
    axes = figure.subplots(1, 2 if preconditioner else 1, squeeze=False)[0]
    name = plain_text(run.optimizer_name or "the optimizer")
    left = axes[0]
    for metric, label, color in (
        ("update_nat_cosine", "with −F̃⁻¹g (natural gradient)", "#2ca02c"),
        ("update_ef_cosine", "with −ẼF⁻¹g (EF step)", "#d62728"),
        ("update_grad_cosine", "with −g (gradient)", "#1f77b4"),
    ):
        steps, values = run.series(run.key(metric))
        left.plot(steps, values, color=color, marker=_marker(steps), label=label)
    left.axhline(STEP_COSINE, color="gray", linestyle=":", label="60° (cos 0.5)")
    left.set_ylim(-1.05, 1.05)
    left.set_title(f"cosine of {name}'s step ({run.primary_structure}, whole network)")
    left.set_xlabel("training step")
    if preconditioner:
        right = axes[1]
        for (metric, label), color in zip(preconditioner, ("#d62728", "#2ca02c"), strict=False):
            steps, values = run.series(keys.optimizer_key(metric, keys.ALL))
            right.plot(steps, values, color=color, marker=_marker(steps), label=label)
        right.set_ylim(-0.05, 1.05)
        right.set_title(f"cosine of {name}'s preconditioner (whole network)")
        right.set_xlabel("training step")
    handles, labels = [], []
    for ax in axes:
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    figure.legend(handles, labels, loc="outside lower center", ncols=3, fontsize="small")
    if len(axes) == 1:
        figure.suptitle(plain_text(run.name))
    return figure


__all__ = [
    "chosen_steps",
    "direction_cosine",
    "heatmap",
    "highlighted_layers",
    "log_axis",
    "log_ratio_distribution",
    "optimizer_audit",
    "png",
    "projections",
    "relative_error",
    "trace_ratio_and_kl",
]
