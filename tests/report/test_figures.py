"""Figures that stay readable: 50 layers, legends off the data, labelled log axes, named runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fisher_monitor.report import figures
from fisher_monitor.report.load import Run

STEPS = list(range(0, 200, 10))


def many_layers(count: int = 50, name: str = "run") -> Run:
    """Layer i has direction cosines around i / count (layer 0 worst, the last best)."""
    rng = np.random.default_rng(0)
    scalars = {}
    names = [f"block{i}.fc" for i in range(count)]
    for i, layer in enumerate([*names, "all"]):
        level = i / count if layer != "all" else 0.5
        values = np.clip(level + 0.02 * rng.standard_normal(len(STEPS)), -1, 1)
        scalars[f"block/direction_cosine/{layer}"] = list(zip(STEPS, values, strict=True))
        scalars[f"block/rel_error/{layer}"] = [(s, 0.1 + i / 10) for s in STEPS]
    for metric, value in (
        ("trace_ratio", 1.2),
        ("kl", 0.3),
        ("nat_projection", 2.0),
        ("ef_projection", 30.0),
        ("ef_projection_per_sample", 200.0),
    ):
        scalars[f"block/{metric}/all"] = [(s, value * (1 + s / 400)) for s in STEPS]
    return Run(name, Path(name), "fisher", scalars)


def drawn(figure: Figure) -> Figure:
    FigureCanvasAgg(figure).draw()
    return figure


def overlaps(a, b) -> bool:
    return not (a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0)


def test_fifty_layers_name_the_worst_and_best_and_grey_the_rest():
    """Issue 12, item 7: with 50 layers the legend neither lists 50 names nor covers data."""
    run = many_layers()
    figure = drawn(figures.direction_cosine([run]))
    (ax,) = figure.axes
    legend = ax.get_legend()
    labels = [text.get_text() for text in legend.get_texts()]
    worst = [label for label in labels if "(worst" in label]
    best = [label for label in labels if "(best" in label]
    assert [label.split()[0] for label in worst] == ["block0.fc", "block1.fc", "block2.fc"]
    assert {label.split()[0] for label in best} == {"block49.fc", "block48.fc"}
    assert "other 45 layers" in labels and "all layers" in labels
    assert len(labels) <= 10
    grey = [line for line in ax.get_lines() if line.get_color() == "#b0b0b0"]
    assert len(grey) == 45
    renderer = figure.canvas.get_renderer()
    assert not overlaps(legend.get_window_extent(renderer), ax.get_window_extent(renderer))


def test_few_layers_are_all_named():
    run = many_layers(count=3)
    (ax,) = drawn(figures.relative_error([run])).axes
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == ["block0.fc", "block1.fc", "block2.fc", "all layers"]


def test_log_axes_have_labelled_ticks():
    """Issue 10, item 7: a log axis over less than a decade still has readable numbers."""
    for values in ([0.2, 0.3, 1.5], [1e-6, 1e-2, 50.0]):
        figure = Figure()
        ax = figure.subplots()
        ax.plot(range(len(values)), values)
        assert figures.log_axis(ax, values)
        drawn(figure)
        low, high = ax.get_ylim()
        shown = [
            label.get_text()
            for tick, label in zip(ax.get_yticks(), ax.get_yticklabels(), strict=True)
            if low <= tick <= high
        ]
        assert len(shown) >= 3 and all(shown), shown
    figure = Figure()
    assert not figures.log_axis(figure.subplots(), [1.0, 1.5])  # no log scale without need
    assert not figures.log_axis(figure.subplots(), [0.0, 1.0, 10.0])  # zero cannot be shown


def test_projections_are_described_as_sums_over_layers():
    run = many_layers(count=4)
    (ax,) = drawn(figures.projections([run])).axes
    assert "whole network ('all')" in ax.get_title()
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert "4 layers: bound of gᵀẼF⁻¹g (≤ 1 per layer)" in labels
    assert all("sum over layers" in label for label in labels[:3])
    assert ax.get_yscale() == "log"


def test_runs_are_labelled_by_name_in_overlays():
    runs = [many_layers(count=2, name="sgd/version_0"), many_layers(count=2, name="adam/version_0")]
    figure = drawn(figures.trace_ratio_and_kl(runs))
    (legend,) = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == ["sgd/version_0", "adam/version_0"]
    renderer = figure.canvas.get_renderer()
    for ax in figure.axes:
        assert not overlaps(legend.get_window_extent(renderer), ax.get_window_extent(renderer))


def test_heat_map_has_a_row_per_layer():
    run = many_layers()
    heat, _ = figures.heatmap(run).axes
    assert len(heat.get_yticklabels()) == 51
    image = heat.get_images()[0].get_array()
    assert image.shape == (51, len(STEPS)) and not np.ma.getmaskarray(image).any()
