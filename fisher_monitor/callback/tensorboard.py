"""The TensorBoard writer: described scalars, the Custom Scalars layout, histograms, images.

Lightning's ``log_metrics`` cannot attach a description to a tag, so this writer writes
the monitor's scalars itself, through the logger's ``SummaryWriter``, with the metric's
one-line description (``keys.DESCRIPTIONS``) and its glossary entry in the tag's summary
metadata on its first event. Nothing goes through the logger's ``log_metrics`` as well, so
no tag is written twice. The run-information file (:mod:`fisher_monitor.runinfo`) is
written next to the event files.

TensorBoard's default (fast) data loader does not serve those descriptions, so what a
user must know to read the charts is also where a default TensorBoard shows it: in the
Custom Scalars chart titles (:mod:`fisher_monitor.callback.layout`), in a Text card
``{prefix}/guide`` (:func:`guide_markdown`), and in the heat map image itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fisher_monitor import keys, runinfo
from fisher_monitor.callback.history import History
from fisher_monitor.callback.layout import custom_scalar_layout
from fisher_monitor.callback.writers import LoggerWriter, RunInfo, logged_key
from fisher_monitor.report.thresholds import (
    AGREE_COSINE,
    DISAGREE_COSINE,
    REL_ERROR_CLOSE,
    REL_ERROR_LIMIT,
    STEP_COSINE,
    TRACE_RATIO_RANGE,
)

#: Description of each histogram group.
HISTOGRAM_DESCRIPTIONS = {
    "log10_ef_over_f": "log10(EF_ii / F_ii) over the layer's parameters: centred at 0 and "
    "narrow when the diagonals agree; shifted for a scale mismatch; wide when the EF "
    "reweights parameters.",
    "log10_preconditioner_over_sqrt_f": "log10 of the optimizer's diagonal preconditioner "
    "over √diag F: a constant offset is harmless (the learning rate absorbs it), spread "
    "means it scales coordinates unlike the Fisher.",
}
IMAGE_DESCRIPTION = (
    "Direction cosine cos(F̃⁻¹g, ẼF⁻¹g), layers × measured steps: green from 0.9 (the EF "
    "step agrees with the natural gradient), red below 0.5 (it points elsewhere). Terms: "
    "docs/glossary.md#direction-cosine."
)
#: The glossary entry of each metric (chart descriptions link it).
GLOSSARY_ANCHORS = {
    "direction_cosine": "docs/glossary.md#direction-cosine",
    "rel_error": "docs/glossary.md#rel-error",
    "matrix_cosine": "docs/glossary.md#rel-error",
    "trace_ratio": "docs/glossary.md#trace-ratio",
    "kl": "docs/glossary.md#kl",
    "nat_grad_cosine": "docs/glossary.md#natural-gradient",
    "ef_grad_cosine": "docs/glossary.md#natural-gradient",
    "nat_projection": "docs/glossary.md#damped",
    "ef_projection": "docs/glossary.md#damped",
    "ef_projection_per_sample": "docs/glossary.md#damped",
    "dimension": "docs/glossary.md#structures",
    "damping": "docs/glossary.md#damping",
    "update_nat_cosine": "docs/glossary.md#natural-gradient",
    "update_ef_cosine": "docs/glossary.md#natural-gradient",
    "update_grad_cosine": "docs/glossary.md#natural-gradient",
    "preconditioner_fisher_cosine": "docs/glossary.md#preconditioner",
    "preconditioner_ef_cosine": "docs/glossary.md#preconditioner",
}


def description(key: str) -> str:
    """The one-line description of a key (without the prefix), with its glossary entry.

    Empty when the key is unknown.
    """
    if key.startswith(keys.PROBE + "/"):
        text = keys.PROBE_DESCRIPTIONS.get(key[len(keys.PROBE) + 1 :], "")
        return f"{text} Terms: docs/glossary.md#probe." if text else ""
    parsed = keys.parse_key(key)
    if parsed is None:
        return ""
    text = keys.DESCRIPTIONS.get(parsed.metric, "")
    where = "whole network" if parsed.layer == keys.ALL else f"layer {parsed.layer}"
    context = (
        f"Optimizer audit, {where}."
        if parsed.structure == keys.OPTIMIZER
        else f"Structure {parsed.structure}, {where}"
        + (f", λ = {parsed.damping}" if parsed.damping else "")
        + "."
    )
    terms = f" Terms: {GLOSSARY_ANCHORS.get(parsed.metric, 'docs/glossary.md')}."
    if parsed.stderr:
        return f"Standard error of {parsed.metric} (estimated). {context}{terms}"
    return f"{text} {context}{terms}".strip()


class TensorBoardWriter(LoggerWriter):
    """Everything for a ``TensorBoardLogger`` (on rank zero).

    Args:
        logger: The ``TensorBoardLogger``.
        prefix: The logging prefix.
        histograms: Log histograms.
        images: Log the heat-map image.
    """

    def __init__(self, logger: Any, prefix: str, histograms: bool, images: bool) -> None:
        super().__init__(logger, prefix)
        self.histograms = histograms
        self.images = images
        self._described: set[str] = set()
        self._layout_written = False
        self._info: RunInfo | None = None

    @property
    def writer(self) -> Any:
        """The logger's ``SummaryWriter``."""
        return self.logger.experiment

    @property
    def run_directory(self) -> str | None:
        """The logger's run directory (event files and the run file)."""
        return str(self.logger.log_dir)

    def _log_hyperparameters(self, params: dict[str, Any]) -> None:
        # no second hparams session in the event file (it would hide the user's in the
        # HParams tab): the settings go to the logger's hparams.yaml, the JSON run file
        # and the Text tab
        self.logger.log_hyperparams(params, metrics={})

    def write_info(self, info: RunInfo) -> None:
        """Hyperparameters and the JSON run file.

        The texts and the layout come with the first measurement's scalars
        (:meth:`log_scalars`), once the layers are known.
        """
        super().write_info(info)
        runinfo.write(self.logger.log_dir, info.as_dict())
        self._info = info

    def _write_layout(self, logged: Mapping[str, float]) -> None:
        """The guide and settings texts and the Custom Scalars layout, once."""
        info = self._info
        if self._layout_written or info is None or not info.layers:
            return
        self._layout_written = True
        self.writer.add_text(f"{self.prefix}/guide", guide_markdown(self.prefix, info), 0)
        self.writer.add_text(f"{self.prefix}/settings", settings_markdown(info), 0)
        measured = [layer["layer"] for layer in info.layers if layer.get("measured")]
        settings = info.settings
        self.writer.add_custom_scalars(
            custom_scalar_layout(
                self.prefix,
                settings["structures"],
                _as_list(settings["damping"]),
                measured,
                constant_damping=settings.get("damping_mode") == "absolute",
                audit=bool(settings.get("audit")),
                preconditioner=bool(settings.get("preconditioner")),
                logged=set(logged),
            )
        )

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Write the scalars, each tag's description with its first event.

        The first measurement's scalars also decide the layout (which structure logged
        each overview metric).
        """
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._write_layout(scalars)

        summary = Summary(
            value=[
                Summary.Value(tag=logged_key(self.prefix, key), simple_value=float(value))
                for key, value in scalars.items()
            ]
        )
        described = {logged_key(self.prefix, k): description(k) for k in scalars}
        self._add(summary, step, described, "scalars")

    def log_histograms(self, group: str, values: Mapping[str, np.ndarray], step: int) -> None:
        """One histogram per layer: ``{prefix}/histograms/{group}/{layer}``."""
        if not self.histograms:
            return
        text = HISTOGRAM_DESCRIPTIONS.get(group, "")
        for layer, data in values.items():
            tag = f"{self.prefix}/histograms/{group}/{layer}"
            summary = histogram_summary(tag, data) if len(data) else None
            if summary is not None:
                self._add(summary, step, {tag: text}, "histograms")

    def log_heatmap(self, history: History, step: int) -> None:
        """The direction-cosine heat map of every measurement so far."""
        from torch.utils.tensorboard.summary import image

        if not self.images or not len(history):
            return
        tag = f"{self.prefix}/images/direction_cosine"
        picture = heatmap_image(*history.heatmap())
        summary = image(tag, picture, dataformats="HWC")
        self._add(summary, step, {tag: IMAGE_DESCRIPTION}, "images")

    def _add(self, summary: Any, step: int, descriptions: Mapping[str, str], plugin: str) -> None:
        """Write a summary; a tag's first event carries its description.

        TensorBoard reads a tag's metadata from its first event.
        """
        for value in summary.value:
            text = descriptions.get(value.tag, "")
            if value.tag not in self._described and text:
                value.metadata.summary_description = text
                value.metadata.plugin_data.plugin_name = plugin
            self._described.add(value.tag)
        if summary.value:
            self.writer._get_file_writer().add_summary(summary, step)


#: Equal-width bins of a histogram (TensorBoard's default exponential buckets cost 6× as much).
HISTOGRAM_BINS = 64


def histogram_summary(tag: str, data: Any) -> Any:
    """A TensorBoard histogram of ``data`` in :data:`HISTOGRAM_BINS` equal bins, made with torch.

    Non-finite values are left out; ``None`` when none is finite. The values are binned in
    their own precision; the sum and the sum of squares are float64.

    ``torch.utils.tensorboard``'s own ``histogram`` takes NumPy's ``dot`` for the sum of
    squares; on a small CPU machine the BLAS threads it wakes keep spinning beside
    torch's and slowed the next tens of training steps by 4–5 ms each (measured on 2 cores).
    """
    import torch
    from torch.utils.tensorboard.summary import histogram_raw

    values = torch.as_tensor(data).detach().cpu().flatten()
    if not values.is_floating_point():
        values = values.to(torch.float64)
    values = torch.from_numpy(_finite(values.numpy()))
    if not values.numel():
        return None
    low, high = (value.item() for value in torch.aminmax(values))
    if high > low:
        counts = torch.histc(values, bins=HISTOGRAM_BINS, min=low, max=high)
        limits = torch.linspace(low, high, HISTOGRAM_BINS + 1, dtype=torch.float64)[1:]
    else:
        counts = torch.tensor([float(values.numel())], dtype=torch.float64)
        limits = torch.tensor([high], dtype=torch.float64)
    wide = values.to(torch.float64)  # the moments in float64
    return histogram_raw(
        tag,
        min=low,
        max=high,
        num=values.numel(),
        sum=wide.sum().item(),
        sum_squares=torch.dot(wide, wide).item(),
        bucket_limits=limits.tolist(),
        bucket_counts=counts.tolist(),
    )


def ef_over_f_log_ratios(diagonals: Mapping[str, tuple[Any, Any]]) -> dict[str, np.ndarray]:
    """Per layer, ``log10(EF_ii / F_ii)`` (float32) where both are positive and finite.

    The ratio and its logarithm are taken in the diagonals' own precision (float64 as
    measured: tiny entries of a fitted layer do not underflow as they would in float32).
    """
    import torch

    ratios = {}
    for layer, (fisher, empirical) in diagonals.items():
        # 0/0, x/0, 0/x give NaN, inf and 0 (then -inf): dropped
        logs = torch.log10(torch.div(empirical, fisher)).cpu().numpy()
        ratios[layer] = _finite(logs).astype(np.float32)
    return ratios


def _finite(values: np.ndarray) -> np.ndarray:
    """The finite entries: the array itself where all are finite.

    NumPy's mask and copy take a third of torch's boolean indexing (0.4 against 1.3 ms for
    400k values).
    """
    finite = np.isfinite(values)
    return values if finite.all() else values[finite]


def _as_list(value: Any) -> list[float]:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]


#: Width in pixels of the heat-map image: TensorBoard's image cards are about 350 px wide
#: and scale wider images down (an 800-px map became unreadable), so it is drawn at the
#: size it is shown, with fonts of 10–12 px.
HEATMAP_WIDTH = 340


def heatmap_image(
    steps: Sequence[int], layers: Sequence[str], values: np.ndarray, title: str
) -> np.ndarray:
    """Render a layers × steps heat map of a cosine to an ``(H, W, 3)`` uint8 image.

    Drawn :data:`HEATMAP_WIDTH` pixels wide, for TensorBoard's image card: the colour bar
    below the map, its thresholds spelled out, long layer names cut to their end.

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

    from fisher_monitor.report.plotting import draw_cosine_heatmap

    dpi = 100
    row = 0.22 if len(layers) <= 30 else 0.12
    height = 1.5 + row * len(layers)
    figure = Figure(figsize=(HEATMAP_WIDTH / dpi, height), dpi=dpi, layout="constrained")
    figure.set_layout_engine("constrained", h_pad=0.04, w_pad=0.04)
    canvas = FigureCanvasAgg(figure)
    with _font_size(7.5):
        draw_cosine_heatmap(figure, steps, layers, values, _wrap(title, 44), compact=True)
        canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def _font_size(points: float) -> Any:
    """Matplotlib's base font size for a drawing (``rc_context``)."""
    from matplotlib import rc_context

    return rc_context({"font.size": points})


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def settings_markdown(info: RunInfo) -> str:
    """Markdown for TensorBoard's Text tab: settings, measured layers, notes.

    For people; programs read the JSON run file.
    """
    lines = ["| setting | value |", "| --- | --- |"]
    for key, value in info.settings.items():
        text = ", ".join(map(str, value)) if isinstance(value, list) else value
        lines.append(f"| {_cell(key)} | {_cell(text)} |")
    lines += [
        "",
        "| layer | type | parameters | D | backend | status |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for entry in info.layers:
        status = "measured" if entry["measured"] else f"skipped: {entry['reason']}"
        parameters = _cell(", ".join(entry["parameters"]))
        lines.append(
            f"| {_cell(entry['layer'])} | {entry['type']} | {parameters} "
            f"| {entry['dimension']} | {entry['backend']} | {_cell(status)} |"
        )
    if info.notes:
        lines += ["", "Notes:", *[f"- {_cell(note)}" for note in info.notes]]
    return "\n".join(lines)


def guide_markdown(prefix: str, info: RunInfo) -> str:
    """The Text card ``{prefix}/guide``: how to read this run's charts in a default TensorBoard.

    What the tag descriptions would say if TensorBoard's fast loader served them: where to
    start, what each overview chart compares with its thresholds, smoothing, the heat map,
    the terms and what to do next.
    """
    structures = ", ".join(map(str, info.settings.get("structures", [])))
    audit = bool(info.settings.get("audit"))
    last = (
        "| `update_nat_cosine` | your optimizer's step against the natural-gradient step, "
        f"cos(Δθ, −F̃⁻¹g) | ≥ {STEP_COSINE}: within 60° | — (Adam and SGD do not aim at it) |"
        if audit
        else "| `kl` | KL divergence between the Laplace approximations with F̃ and ẼF, in "
        "nats | 0: the same | grows with the number of parameters |"
    )
    lines = [
        f"**How to read the fisher-monitor charts** (structures: {structures}; schedule "
        f"{info.settings.get('schedule', '?')}).",
        "",
        f"Start with **Custom Scalars → {prefix}: overview**: four charts of the whole network, "
        "one metric each (TensorBoard colours lines by run, so every chart holds one tag):",
        "",
        "| chart | compares | good | bad |",
        "| --- | --- | --- | --- |",
        "| `direction_cosine` | the EF-preconditioned step ẼF⁻¹g against the natural gradient "
        f"F̃⁻¹g | ≥ {AGREE_COSINE}: agree | < {DISAGREE_COSINE}: disagree (more than 60°) |",
        "| `rel_error` | the EF against the Fisher as matrices, ‖EF − F‖ / ‖F‖ | "
        f"≤ {REL_ERROR_CLOSE}: close | > {REL_ERROR_LIMIT}: different matrices |",
        "| `trace_ratio` | the overall curvature scale, tr EF / tr F | 1: same scale | outside "
        f"[{TRACE_RATIO_RANGE[0]}, {TRACE_RATIO_RANGE[1]:g}]; near 1 says nothing about the rest |",
        last,
        "",
        "**Few points.** The monitor measures at a few dozen steps at most; TensorBoard's "
        "default smoothing (0.6) shifts and flattens such curves: set **Smoothing to 0** in "
        "the left panel of Scalars and Time Series (Custom Scalars too; or open "
        "`#custom_scalars&_smoothingWeight=0` on the server's address), and untick *Ignore "
        "outliers in chart scaling* so that no point is cut off.",
        "",
        f"**Per layer**: the `{prefix}: <structure> by layer` categories, one chart per layer. "
        f"**Images → {prefix}/images/direction_cosine**: the direction cosine, layers × steps "
        f"(red < {DISAGREE_COSINE}, yellow, green ≥ {AGREE_COSINE}; grey: not measured), "
        "drawn at the size the card shows it. "
        "**Time Series / Scalars** list every key `structure/metric/layer` after your own "
        "curves.",
        "",
        "F̃ = F + λI and ẼF = EF + λI are the Fisher and the empirical Fisher, damped. Every "
        "term: `docs/glossary.md`. The verdicts, written for your optimizer, are in the "
        "end-of-fit summary and in `fisher-monitor report <this run's directory>`; what to do "
        "about them: `docs/guide/acting.md`.",
    ]
    return "\n".join(lines)
