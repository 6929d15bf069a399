"""Matplotlib drawing shared by the report and the TensorBoard images (no torch, no pyplot).

The cosine heat map's colours carry the verdict thresholds: every cosine below
:data:`~fisher_monitor.report.thresholds.DISAGREE_COSINE` (0.5) is a shade of red, the
band up to :data:`~fisher_monitor.report.thresholds.AGREE_COSINE` (0.9) is yellow, only
agreement is green, and both thresholds are marked on the colour bar.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure

from fisher_monitor.report.thresholds import AGREE_COSINE, DISAGREE_COSINE

#: Colour-band edges of the cosine heat map (the verdict thresholds are two of them).
COSINE_BOUNDS: tuple[float, ...] = (
    -1.0,
    -0.5,
    0.0,
    0.25,
    DISAGREE_COSINE,
    0.7,
    AGREE_COSINE,
    0.97,
    1.0,
)
#: One colour per band: reds below 0.5 (disagreement), yellows up to 0.9, greens from 0.9.
COSINE_COLORS: tuple[str, ...] = (
    "#67001f",
    "#b2182b",
    "#d6604d",
    "#f4a582",
    "#fee08b",
    "#ffffbf",
    "#a6d96a",
    "#1a9850",
)
#: Colour of cells that were not measured.
MISSING_COLOR = "#d9d9d9"

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def plain_text(text: object) -> str:
    """``text`` as matplotlib must show it literally: ``$`` escaped, control characters dropped.

    Layer and run names come from user code; an unescaped ``$`` would start mathtext (and
    a malformed expression would stop the drawing).
    """
    return _CONTROL.sub("", str(text)).replace("$", r"\$")


def cosine_colormap() -> tuple[ListedColormap, BoundaryNorm]:
    """The heat map's banded colour map and its norm (see :data:`COSINE_BOUNDS`)."""
    colormap = ListedColormap(COSINE_COLORS, name="fisher_monitor_cosine")
    colormap = colormap.with_extremes(bad=MISSING_COLOR)
    return colormap, BoundaryNorm(COSINE_BOUNDS, colormap.N)


def short_name(name: str, limit: int = 22) -> str:
    """``name`` in at most ``limit`` characters, for a narrow image.

    Dotted module paths keep their last two parts and the numbers (block indices) of the
    others, and shorten other leading parts to their first letter
    (``encoder.layers.3.self_attn.out_proj`` → ``e.l.3.self_attn.out_proj``). Where that
    is still too long, the second-last part is shortened too, so that the block indices
    that tell layers apart stay (``encoder.layers.11.self_attention.out_proj`` →
    ``e.l.11.s.out_proj``); only then is the end kept.
    """
    name = plain_text(name)
    if len(name) <= limit:
        return name
    parts = name.split(".")
    if len(parts) > 2:
        for kept in (2, 1):
            head = [part if part.isdigit() else part[:1] for part in parts[:-kept]]
            name = ".".join([*head, *parts[-kept:]])
            if len(name) <= limit:
                return name
    return "…" + name[-(limit - 1) :]


def draw_cosine_heatmap(
    figure: Figure,
    steps: Sequence[int],
    layers: Sequence[str],
    grid: np.ndarray,
    title: str,
    compact: bool = False,
) -> None:
    """Draw a layers × steps heat map of a cosine (NaN: not measured) on ``figure``.

    Shared by the report and the callback's TensorBoard image.

    Args:
        figure: An empty figure.
        steps: Training steps (columns).
        layers: Layer names (rows).
        grid: ``len(layers) × len(steps)`` cosines in [−1, 1]; NaN where not measured.
        title: Figure title (shown literally).
        compact: For a narrow image shown at its own size (TensorBoard's image cards):
            the colour bar below the map with the thresholds spelled out, long layer names
            cut to their end.
    """
    if compact:  # a colour bar of fixed thickness below the map, whatever the rows
        ax, bar_ax = figure.subplots(2, 1, height_ratios=[max(len(layers), 1), 0.5])
    else:
        ax, bar_ax = figure.subplots(), None
    colormap, norm = cosine_colormap()
    image = ax.imshow(
        np.ma.masked_invalid(np.asarray(grid, dtype=float)),
        aspect="auto",
        cmap=colormap,
        norm=norm,
        interpolation="nearest",
    )
    size = "small" if len(layers) <= 30 else "x-small" if len(layers) <= 60 else "xx-small"
    names = [short_name(name) if compact else plain_text(name) for name in layers]
    ax.set_yticks(range(len(layers)), labels=names, fontsize=size)
    count = min(len(steps), 5 if compact else 10)
    ticks = np.unique(np.linspace(0, max(len(steps) - 1, 0), num=count).astype(int))
    ax.set_xticks(ticks, labels=[str(steps[i]) for i in ticks])
    ax.set_xlabel("training step")
    lines = "\n".join(plain_text(line) for line in str(title).split("\n"))
    ax.set_title(lines, fontsize="medium" if compact else None)
    if bar_ax is not None:
        bar = figure.colorbar(image, cax=bar_ax, orientation="horizontal")
        bar.set_ticks([-1.0, 0.0, DISAGREE_COSINE, AGREE_COSINE, 1.0])
        bar.set_label(
            f"red < {DISAGREE_COSINE}: disagree · green ≥ {AGREE_COSINE}: agree",
            fontsize="small",
        )
        for threshold in (DISAGREE_COSINE, AGREE_COSINE):
            bar.ax.axvline(threshold, color="black", linewidth=2)
        return
    bar = figure.colorbar(image, ax=ax, ticks=COSINE_BOUNDS, fraction=0.05, pad=0.02)
    bar.set_label(f"cosine (◀ thresholds {DISAGREE_COSINE}, {AGREE_COSINE})")
    for threshold in (DISAGREE_COSINE, AGREE_COSINE):
        bar.ax.axhline(threshold, color="black", linewidth=2.5)
    labels = {DISAGREE_COSINE: f"{DISAGREE_COSINE} ◀", AGREE_COSINE: f"{AGREE_COSINE} ◀"}
    bar.ax.set_yticklabels([labels.get(bound, f"{bound:g}") for bound in COSINE_BOUNDS])


__all__ = [
    "COSINE_BOUNDS",
    "COSINE_COLORS",
    "MISSING_COLOR",
    "cosine_colormap",
    "draw_cosine_heatmap",
    "plain_text",
    "short_name",
]
