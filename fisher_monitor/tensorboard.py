"""TensorBoard extras: custom-scalar layout, histograms, the heat-map image, the settings.

Scalars go through Lightning's loggers (any logger works); this module adds what only a
TensorBoard ``SummaryWriter`` can show. Everything here takes plain data (names, dicts,
tensors), never the model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from fisher_monitor.metrics import METRICS, damping_suffix

#: Metrics shown one chart each, layers side by side: all of DESIGN.md §3 but the
#: dimension, the direction cosine first.
LAYER_CHARTS = (
    "direction_cosine",
    *(metric for metric in METRICS if metric not in ("direction_cosine", "dimension")),
)


def tensorboard_writers(loggers: Iterable) -> list:
    """The ``SummaryWriter`` of each TensorBoard logger (either Lightning namespace).

    Args:
        loggers: ``trainer.loggers``.

    Returns:
        Writers (on non-zero ranks Lightning returns a no-op stand-in).
    """
    writers = []
    for logger in loggers:
        if type(logger).__name__ == "TensorBoardLogger":
            writers.append(logger.experiment)
    return writers


def custom_scalar_layout(
    prefix: str, structures: Sequence[str], dampings: Sequence[float]
) -> dict[str, dict[str, list]]:
    """The "Custom Scalars" layout: per structure, one multi-line chart per metric.

    Each metric chart overlays every layer and ``all`` (regular expressions over the tags);
    two charts per structure put F against EF: the projections ``gᵀF̃⁻¹g`` vs ``gᵀẼF⁻¹g``
    (with the per-sample projection and ``D`` for reference) and the gradient cosines.

    Args:
        prefix: Logging prefix, e.g. ``"fisher"``.
        structures: Measured structures.
        dampings: Damping values (several: one set of F-vs-EF charts per value).

    Returns:
        A layout for ``SummaryWriter.add_custom_scalars``.
    """
    several = len(dampings) > 1
    p = re.escape(prefix)
    layout: dict[str, dict[str, list]] = {}
    for structure in structures:
        s = re.escape(structure)
        charts: dict[str, list] = {}
        for metric in LAYER_CHARTS:
            charts[f"{metric} (layers)"] = ["Multiline", [rf"{p}/{s}/{metric}(@[^/]*)?/.*"]]
        for damping in dampings:
            suffix = damping_suffix(damping, several)
            label = f" λ={damping:g}" if several else ""
            charts[f"F vs EF: projections (all){label}"] = [
                "Multiline",
                [
                    f"{prefix}/{structure}/nat_projection{suffix}/all",
                    f"{prefix}/{structure}/ef_projection{suffix}/all",
                    f"{prefix}/{structure}/ef_projection_per_sample{suffix}/all",
                    f"{prefix}/{structure}/dimension/all",
                ],
            ]
            charts[f"F vs EF: gradient cosines (all){label}"] = [
                "Multiline",
                [
                    f"{prefix}/{structure}/nat_grad_cosine{suffix}/all",
                    f"{prefix}/{structure}/ef_grad_cosine{suffix}/all",
                ],
            ]
        layout[f"{prefix}: {structure}"] = charts
    layout[f"{prefix}: probe"] = {
        "loss": ["Multiline", [f"{prefix}/probe/loss"]],
        "gradient norm": ["Multiline", [f"{prefix}/probe/grad_norm"]],
        "seconds per measurement": ["Multiline", [f"{prefix}/probe/seconds"]],
    }
    return layout


def log_ratio(fisher: Tensor, empirical: Tensor) -> Tensor:
    """``log10(EF_ii / F_ii)`` (float32) over the entries where both are positive and finite."""
    ratio = torch.log10(empirical.float()) - torch.log10(fisher.float())
    return ratio[torch.isfinite(ratio)]  # drops zeros (±inf), NaN and infinities alike


def log_histograms(
    writer, prefix: str, diagonals: Mapping[str, tuple[Tensor, Tensor]], step: int
) -> None:
    """Histogram of ``log10(EF_ii/F_ii)`` per layer.

    Tags: ``{prefix}/histograms/log10_ef_over_f/{layer}``.
    """
    for layer, (fisher, empirical) in diagonals.items():
        values = log_ratio(fisher, empirical)
        if values.numel():
            # 64 equal bins: TensorBoard's default exponential buckets cost 6× as much
            writer.add_histogram(
                f"{prefix}/histograms/log10_ef_over_f/{layer}",
                values.numpy(),
                step,
                bins=64,
            )


def heatmap_image(
    steps: Sequence[int], layers: Sequence[str], values: np.ndarray, title: str
) -> np.ndarray:
    """Render a layers × steps heat map of a cosine to an ``(H, W, 3)`` uint8 image.

    Args:
        steps: Training steps (columns).
        layers: Layer names (rows).
        values: ``len(layers) × len(steps)`` values in [−1, 1] (NaN: not measured).
        title: Figure title.

    Returns:
        RGB image.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fisher_monitor.report.figures import draw_cosine_heatmap

    height = 1.6 + 0.32 * len(layers)
    figure = Figure(figsize=(8, height), dpi=100)
    canvas = FigureCanvasAgg(figure)
    draw_cosine_heatmap(figure, steps, layers, values, title)
    figure.subplots_adjust(
        left=0.22, right=0.98, bottom=0.55 / height + 0.05, top=1 - 0.45 / height
    )
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def settings_markdown(settings: Mapping, coverage: Sequence[Mapping], notes: Sequence[str]) -> str:
    """Markdown shown in TensorBoard's Text tab: settings, coverage of the layers, notes.

    The report command parses this text back (``report.load.parse_settings``).

    Args:
        settings: Setting name to value.
        coverage: ``Measurement.coverage`` entries (layer, type, parameters, dimension,
            backend, measured, reason).
        notes: Notes of the measurement.

    Returns:
        The markdown text.
    """
    lines = ["| setting | value |", "| --- | --- |"]
    lines += [f"| {_cell(key)} | {_cell(value)} |" for key, value in settings.items()]
    lines += [
        "",
        "| layer | type | parameters | D | backend | status |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for entry in coverage:
        status = "measured" if entry["measured"] else f"skipped: {entry['reason']}"
        parameters = _cell(", ".join(entry["parameters"]))
        lines.append(
            f"| {_cell(entry['layer'])} | {entry['type']} | {parameters} "
            f"| {entry['dimension']} | {entry['backend']} | {_cell(status)} |"
        )
    if notes:
        lines += ["", "Notes:", *[f"- {_cell(note)}" for note in notes]]
    return "\n".join(lines)
