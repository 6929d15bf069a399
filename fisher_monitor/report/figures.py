"""Figures of a report, drawn from the logs only (matplotlib, no global pyplot state)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fisher_monitor.report.load import Run
from fisher_monitor.report.verdict import AGREE_COSINE, DISAGREE_COSINE

WIDTH = 10.0  # inches at 100 dpi: readable on a laptop screen


def png(figure: Figure) -> bytes:
    """Render a figure to PNG bytes."""
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def _grid(count: int, height: float) -> tuple[Figure, list]:
    figure = Figure(figsize=(WIDTH, height * count), dpi=100, layout="constrained")
    axes = figure.subplots(count, 1, squeeze=False)[:, 0]
    return figure, list(axes)


def _title(run: Run, several: bool, text: str) -> str:
    return f"{run.name}: {text}" if several else text


def direction_cosine(runs: Sequence[Run]) -> Figure:
    """cos(natural gradient, EF direction) over steps: every layer, and ``all`` in bold."""
    figure, axes = _grid(len(runs), 3.2)
    for run, ax in zip(runs, axes, strict=True):
        for layer in run.layers:
            steps, values = run.series(run.key("direction_cosine", layer))
            ax.plot(steps, values, marker=".", linewidth=1, alpha=0.8, label=layer)
        steps, values = run.series(run.key("direction_cosine"))
        ax.plot(steps, values, color="black", linewidth=2.5, label="all")
        ax.axhline(AGREE_COSINE, color="green", linestyle=":", linewidth=1)
        ax.axhline(DISAGREE_COSINE, color="red", linestyle=":", linewidth=1)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("training step")
        ax.set_ylabel("direction cosine")
        ax.set_title(_title(run, len(runs) > 1, f"{run.primary_structure}: cos(A⁻¹g, B⁻¹g)"))
        ax.legend(fontsize="small", ncol=4, loc="lower left")
    return figure


def trace_ratio_and_kl(runs: Sequence[Run]) -> Figure:
    """Whole-network trace ratio (log scale) and KL divergence over steps, runs overlaid."""
    figure = Figure(figsize=(WIDTH, 3.4), dpi=100, layout="constrained")
    left, right = figure.subplots(1, 2)
    finite = []
    for run in runs:
        steps, ratios = run.series(run.key("trace_ratio"))
        left.plot(steps, ratios, marker=".", label=run.name)
        finite += [v for v in ratios if np.isfinite(v) and v > 0]
        steps, kls = run.series(run.key("kl"))
        right.plot(steps, kls, marker=".", label=run.name)
    left.axhline(1.0, color="gray", linestyle=":")
    if finite and max(finite) / min(finite) > 3:  # log scale only where it helps
        left.set_yscale("log")
    left.set_title("tr EF / tr F (all layers)")
    right.set_yscale("symlog", linthresh=1e-3)
    right.set_title("KL(Laplace with F ‖ Laplace with EF), nats")
    for ax in (left, right):
        ax.set_xlabel("training step")
        if len(runs) > 1:
            ax.legend(fontsize="small")
    return figure


def relative_error(runs: Sequence[Run]) -> Figure:
    """‖EF − F‖/‖F‖ per layer and overall, over steps."""
    figure, axes = _grid(len(runs), 3.0)
    for run, ax in zip(runs, axes, strict=True):
        for layer in run.layers:
            ax.plot(*run.series(run.key("rel_error", layer)), marker=".", linewidth=1, label=layer)
        ax.plot(*run.series(run.key("rel_error")), color="black", linewidth=2.5, label="all")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("relative error")
        ax.set_title(_title(run, len(runs) > 1, "‖EF − F‖_F / ‖F‖_F"))
        ax.legend(fontsize="small", ncol=4)
    return figure


def projections(runs: Sequence[Run]) -> Figure:
    """gᵀF̃⁻¹g and gᵀẼF⁻¹g, with the per-sample projection and D for reference."""
    figure, axes = _grid(len(runs), 3.0)
    for run, ax in zip(runs, axes, strict=True):
        for metric, label, style in (
            ("nat_projection", "gᵀ F̃⁻¹ g", "-"),
            ("ef_projection", "gᵀ ẼF⁻¹ g", "-"),
            ("ef_projection_per_sample", "(1/N) Σ g_nᵀ ẼF⁻¹ g_n", "--"),
            ("dimension", "D", ":"),
        ):
            steps, values = run.series(run.key(metric))
            ax.plot(
                steps, values, linestyle=style, marker="." if style == "-" else None, label=label
            )
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_title(_title(run, len(runs) > 1, "projections of the gradient (all layers)"))
        ax.legend(fontsize="small", ncol=2)
    return figure


def heatmap(run: Run) -> Figure:
    """Layers × steps heat map of the direction cosine."""
    layers = [*run.layers, "all"]
    steps = run.steps
    grid = np.full((len(layers), len(steps)), np.nan)
    position = {step: j for j, step in enumerate(steps)}
    for i, layer in enumerate(layers):
        for step, value in zip(*run.series(run.key("direction_cosine", layer)), strict=True):
            if step in position:
                grid[i, position[step]] = value
    figure = Figure(figsize=(WIDTH, 1.2 + 0.35 * len(layers)), dpi=100, layout="constrained")
    draw_cosine_heatmap(
        figure,
        steps,
        layers,
        grid,
        f"{run.name}: direction cosine per layer ({run.primary_structure})",
    )
    return figure


def draw_cosine_heatmap(
    figure: Figure, steps: Sequence[int], layers: Sequence[str], grid: np.ndarray, title: str
) -> None:
    """Draw a layers × steps heat map of a cosine (NaN: not measured) on ``figure``.

    Shared by the report and the callback's TensorBoard image.
    """
    ax = figure.subplots()
    image = ax.imshow(
        np.ma.masked_invalid(grid),
        aspect="auto",
        cmap="RdYlGn",
        vmin=-1,
        vmax=1,
        interpolation="nearest",
    )
    ax.set_yticks(range(len(layers)), labels=list(layers))
    ticks = np.unique(np.linspace(0, max(len(steps) - 1, 0), num=min(len(steps), 10)).astype(int))
    ax.set_xticks(ticks, labels=[str(steps[i]) for i in ticks])
    ax.set_xlabel("training step")
    ax.set_title(title)
    figure.colorbar(image, ax=ax, label="cosine")


def chosen_steps(steps: Sequence[int]) -> list[int]:
    """First, middle and last step (without repeats)."""
    if not steps:
        return []
    picks = [steps[0], steps[len(steps) // 2], steps[-1]]
    return sorted(set(picks))


def log_ratio_distribution(run: Run) -> Figure | None:
    """Distribution of log10(EF_ii / F_ii) per layer at the first, middle and last step."""
    if not run.histograms:
        return None
    steps = chosen_steps(sorted({h.step for hs in run.histograms.values() for h in hs}))
    figure = Figure(figsize=(WIDTH, 3.2), dpi=100, layout="constrained")
    axes = figure.subplots(1, len(steps), squeeze=False)[0]
    for ax, step in zip(axes, steps, strict=True):
        for layer in run.layers:
            histogram = next((h for h in run.histograms.get(layer, []) if h.step == step), None)
            if histogram is None or not histogram.counts.sum():
                continue
            density = histogram.counts / histogram.counts.sum()
            ax.stairs(density, histogram.edges, label=layer)
        ax.axvline(0.0, color="gray", linestyle=":")
        ax.set_xlabel("log10(EF_ii / F_ii)")
        ax.set_title(f"step {step}")
    axes[0].set_ylabel("share of parameters")
    axes[-1].legend(fontsize="small")
    figure.suptitle(f"{run.name}: diagonal entries, EF against F")
    return figure
