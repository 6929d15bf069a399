"""The shared heat map: verdict thresholds in its colours and on its colour bar; literal names."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from fisher_monitor.report.figures import png
from fisher_monitor.report.plotting import (
    cosine_colormap,
    draw_cosine_heatmap,
    plain_text,
    short_name,
)


def colour(value: float) -> tuple[float, float, float]:
    colormap, norm = cosine_colormap()
    return colormap(norm(value))[:3]


def test_disagreement_is_never_green_and_agreement_is():
    """Issue 10, item 7: below 0.5 must not look green."""
    for value in (-1.0, -0.3, 0.0, 0.3, 0.49):
        red, green, _ = colour(value)
        assert red > green, value
    for value in (0.9, 0.95, 1.0):
        red, green, blue = colour(value)
        assert green > red and green > blue, value
    for value in (0.5, 0.7, 0.89):  # mixed: yellow (red and green both high, little blue)
        red, green, blue = colour(value)
        assert min(red, green) > 0.85 and blue < min(red, green), value
    assert colour(0.49) != colour(0.5) and colour(0.89) != colour(0.9)  # bands change there


def test_colour_bar_marks_both_thresholds():
    figure = Figure()
    grid = np.array([[0.1, 0.6, np.nan], [0.95, -0.5, 0.9]])
    draw_cosine_heatmap(figure, [0, 10, 20], ["a", "b"], grid, "title")
    heat, bar = figure.axes
    marked = sorted(line.get_ydata()[0] for line in bar.get_lines())
    assert marked == [0.5, 0.9]
    labels = [label.get_text() for label in bar.get_yticklabels()]
    assert "0.5 ◀" in labels and "0.9 ◀" in labels
    assert "0.5" in bar.get_ylabel() and "0.9" in bar.get_ylabel()
    assert [label.get_text() for label in heat.get_yticklabels()] == ["a", "b"]


def test_names_are_drawn_literally():
    assert plain_text("$x$") == r"\$x\$" and plain_text("a\x1b[1mb") == "a[1mb"
    figure = Figure()
    names = ["$\\frac{", "ok", "50$ and $"]  # malformed mathtext would stop the drawing
    draw_cosine_heatmap(figure, [0], names, np.zeros((3, 1)), "$title")
    assert png(figure)[:4] == b"\x89PNG"


def test_short_names_keep_the_block_indices_that_tell_layers_apart():
    names = [f"encoder.layers.{i}.self_attention.out_proj" for i in (0, 1, 11)]
    short = [short_name(name) for name in names]
    assert short == ["e.l.0.s.out_proj", "e.l.1.s.out_proj", "e.l.11.s.out_proj"]
    assert short_name("encoder.layers.3.attn.out_proj") == "e.l.3.attn.out_proj"
    assert short_name("net.0") == "net.0"  # short names stay as they are
    two_parts = "a_rather_long_module_name.projection_weights"  # no path to shorten: its end
    assert short_name(two_parts) == "…" + two_parts[-21:]
    very_long = short_name("x.y.a_parameter_name_longer_than_the_limit")
    assert len(very_long) == 22 and very_long.startswith("…") and very_long.endswith("limit")
