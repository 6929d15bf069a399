"""Verdicts: plain sentences about a run, each with the numbers and thresholds behind it.

All thresholds live here (and are printed in the README and the HTML report):

- the EF direction *disagrees* with the natural gradient when ``direction_cosine < 0.5``
  and *agrees* when ``≥ 0.9``; EF preconditioning is judged *not a good stand-in* when
  the direction disagrees in at least half of the measurements, *a fair stand-in* when it
  agrees in at least 90%, *mixed* otherwise;
- the EF *differs as a matrix* when its relative Frobenius error ``rel_error > 0.5``;
- the EF *misjudges the curvature scale* when ``trace_ratio`` leaves ``[0.5, 2]``;
- the *trace hides a mismatch* when the trace ratio stays in ``[0.8, 1.25]`` while the
  relative error exceeds 0.5 (the paper's warning that traces alone can mislead).

Medians are over the measurements of the run; "worst" is the lowest direction cosine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from fisher_monitor.report.load import Run

DISAGREE_COSINE = 0.5
AGREE_COSINE = 0.9
DISAGREE_SHARE = 0.5
AGREE_SHARE = 0.9
REL_ERROR_LIMIT = 0.5
TRACE_RATIO_RANGE = (0.5, 2.0)
TRACE_AGREES_RANGE = (0.8, 1.25)

THRESHOLDS = {
    "disagree_cosine": DISAGREE_COSINE,
    "agree_cosine": AGREE_COSINE,
    "disagree_share": DISAGREE_SHARE,
    "agree_share": AGREE_SHARE,
    "rel_error_limit": REL_ERROR_LIMIT,
    "trace_ratio_range": list(TRACE_RATIO_RANGE),
    "trace_agrees_range": list(TRACE_AGREES_RANGE),
}


@dataclass
class Verdict:
    """One sentence of the report.

    Attributes:
        topic: ``"preconditioning"``, ``"matrix"``, ``"scale"`` or ``"trace"``.
        level: ``"bad"``, ``"mixed"`` or ``"good"``.
        text: The sentence, with its numbers.
        numbers: The numbers behind the sentence (stable keys).
    """

    topic: str
    level: str
    text: str
    numbers: dict[str, float | int | str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Plain data for JSON."""
        return asdict(self)


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def worst_step(run: Run) -> int:
    """The step with the lowest whole-network direction cosine (last step if none)."""
    steps, values = run.series(run.key("direction_cosine"))
    if not len(values) or not np.isfinite(values).any():
        return run.steps[-1]
    return int(steps[np.nanargmin(values)])


def worst_layer(run: Run) -> tuple[str, float]:
    """The layer with the lowest median direction cosine, and that median."""
    medians = {}
    for layer in run.layers:
        values = _finite(run.series(run.key("direction_cosine", layer))[1])
        if len(values):
            medians[layer] = float(np.median(values))
    if not medians:
        return "all", float("nan")
    layer = min(medians, key=medians.get)
    return layer, medians[layer]


def _percent(share: float) -> str:
    return f"{100 * share:.0f}%"


def verdicts(run: Run) -> list[Verdict]:
    """All verdicts for a run, headline (preconditioning) first."""
    structure = run.primary_structure
    out = []
    cosines = _finite(run.series(run.key("direction_cosine"))[1])
    count = len(cosines)
    if count:
        disagree = float(np.mean(cosines < DISAGREE_COSINE))
        agree = float(np.mean(cosines >= AGREE_COSINE))
        median = float(np.median(cosines))
        layer, layer_median = worst_layer(run)
        numbers = {
            "structure": structure,
            "measurements": count,
            "disagree_share": disagree,
            "agree_share": agree,
            "median_direction_cosine": median,
            "worst_layer": layer,
            "worst_layer_median_direction_cosine": layer_median,
        }
        where = f"worst in layer `{layer}` (median cosine {layer_median:.2f})"
        if disagree >= DISAGREE_SHARE:
            level = "bad"
            text = (
                "The EF direction disagreed with the natural gradient "
                f"(cosine < {DISAGREE_COSINE}) in {_percent(disagree)} of {count} measurements "
                f"(median cosine {median:.2f}, "
                f"{structure}), {where}: EF-based preconditioning is not a good stand-in for "
                "natural-gradient steps here."
            )
        elif agree >= AGREE_SHARE:
            level = "good"
            text = (
                f"The EF direction agreed with the natural gradient (cosine ≥ {AGREE_COSINE}) in "
                f"{_percent(agree)} of {count} measurements (median cosine {median:.2f}, "
                f"{structure}), {where}: EF-based preconditioning is a fair stand-in here."
            )
        else:
            level = "mixed"
            text = (
                f"The EF direction agreed with the natural gradient (cosine ≥ {AGREE_COSINE}) in "
                f"only {_percent(agree)} and disagreed (cosine < {DISAGREE_COSINE}) in "
                f"{_percent(disagree)} of {count} measurements (median cosine {median:.2f}, "
                f"{structure}), {where}: EF preconditioning is a partial stand-in; check the "
                "layers and steps below."
            )
        out.append(Verdict("preconditioning", level, text, numbers))
    errors = _finite(run.series(run.key("rel_error"))[1])
    kls = _finite(run.series(run.key("kl"))[1])
    if len(errors):
        median_error = float(np.median(errors))
        share = float(np.mean(errors > REL_ERROR_LIMIT))
        median_kl = float(np.median(kls)) if len(kls) else math.nan
        level = "bad" if median_error > REL_ERROR_LIMIT else "good"
        comparison = "more" if level == "bad" else "less"
        text = (
            f"As matrices, EF and F differ by {100 * median_error:.0f}% in the median "
            f"(relative Frobenius error, {structure}; above {REL_ERROR_LIMIT} in "
            f"{_percent(share)} of measurements), {comparison} than the {REL_ERROR_LIMIT} "
            f"threshold; the KL divergence between the two Laplace approximations has median "
            f"{median_kl:.3g} nats: "
            + (
                "uncertainty estimates built on the EF (Laplace, TIC) inherit that error."
                if level == "bad"
                else "the EF is a usable stand-in for the Fisher as a matrix."
            )
        )
        out.append(
            Verdict(
                "matrix",
                level,
                text,
                {
                    "median_rel_error": median_error,
                    "rel_error_above_share": share,
                    "median_kl": median_kl,
                },
            )
        )
    ratios = _finite(run.series(run.key("trace_ratio"))[1])
    if len(ratios):
        low, high = TRACE_RATIO_RANGE
        median_ratio = float(np.median(ratios))
        outside = float(np.mean((ratios < low) | (ratios > high)))
        level = "bad" if not low <= median_ratio <= high else "good"
        text = (
            f"tr EF / tr F ranged from {ratios.min():.3g} to {ratios.max():.3g} (median "
            f"{median_ratio:.3g}; outside [{low}, {high}] in {_percent(outside)} of measurements): "
            + (
                f"the EF {'over' if median_ratio > high else 'under'}states the curvature scale, "
                "which matters for Adam-style diagonal scaling and damping choices."
                if level == "bad"
                else "the overall curvature scale of the EF is about right."
            )
        )
        out.append(
            Verdict(
                "scale",
                level,
                text,
                {
                    "median_trace_ratio": median_ratio,
                    "min_trace_ratio": float(ratios.min()),
                    "max_trace_ratio": float(ratios.max()),
                    "outside_share": outside,
                },
            )
        )
        low_ok, high_ok = TRACE_AGREES_RANGE
        if len(errors) and low_ok <= median_ratio <= high_ok and median_error > REL_ERROR_LIMIT:
            out.append(
                Verdict(
                    "trace",
                    "bad",
                    f"The traces agree (median ratio {median_ratio:.2f}) while the matrices "
                    f"do not (median relative error {median_error:.2f}): the trace "
                    "alone hides this mismatch.",
                    {"median_trace_ratio": median_ratio, "median_rel_error": median_error},
                )
            )
    return out


def headline(run: Run) -> Verdict | None:
    """The first (preconditioning) verdict, or ``None`` when nothing was measured."""
    found = verdicts(run)
    return found[0] if found else None


#: The per-layer tables' columns after the layer name: metric and column heading.
LAYER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("dimension", "D"),
    ("direction_cosine", "direction cosine"),
    ("trace_ratio", "tr EF / tr F"),
    ("rel_error", "rel. error"),
    ("kl", "KL"),
    ("nat_projection", "gᵀF̃⁻¹g"),
    ("ef_projection", "gᵀẼF⁻¹g"),
)


def layer_table(run: Run, step: int) -> list[dict[str, float | str]]:
    """Per-layer values of the :data:`LAYER_COLUMNS` metrics at ``step`` (plus ``all``)."""
    rows = []
    for layer in [*run.layers, "all"]:
        row: dict[str, float | str] = {"layer": layer}
        for metric, _ in LAYER_COLUMNS:
            row[metric] = run.value(run.key(metric, layer), step)
        rows.append(row)
    return rows
