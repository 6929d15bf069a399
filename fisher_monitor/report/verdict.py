"""Verdicts: plain sentences about a run, each with its numbers and what to do about it.

The thresholds live in :mod:`fisher_monitor.report.thresholds` (and are printed in every
report):

- *preconditioning*: the EF direction *disagrees* with the natural gradient when
  ``direction_cosine < 0.5`` and *agrees* when ``≥ 0.9``; EF preconditioning is *not a
  good stand-in* when it disagrees in at least half of the measurements, *a fair
  stand-in* when it agrees in at least 90%, *mixed* otherwise;
- *matrix*: the EF *differs as a matrix* when the median relative Frobenius error
  ``rel_error`` exceeds 0.5;
- *scale*: the EF *misjudges the curvature scale* when the median ``trace_ratio``
  leaves ``[0.5, 2]``;
- *trace*: the *trace hides a mismatch* when the trace ratio stays in ``[0.8, 1.25]``
  while the relative error exceeds 0.5 (the paper's warning that traces alone mislead);
- *optimizer* (when the optimizer's steps were audited): its steps point *within 60°* of
  the natural gradient when ``update_nat_cosine ≥ 0.5``; good in at least 90% of the
  measurements, bad in under half; its preconditioner *follows* the EF (or F) when its
  cosine with √diag EF exceeds the one with √diag F by 0.05 (or the reverse).

Every topic needs evidence: with fewer than 5 measurements, or none after a training
step, its verdict is *insufficient evidence*, with what is known as numbers and what to
change. All numbers are of the whole network (``all``) in the primary structure (block,
else kron, else diag) at the first damping; medians are over the measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fisher_monitor import keys
from fisher_monitor.report.load import Run
from fisher_monitor.report.thresholds import (
    AGREE_COSINE,
    AGREE_SHARE,
    DISAGREE_COSINE,
    DISAGREE_SHARE,
    FOLLOWS_MARGIN,
    MIN_MEASUREMENTS,
    REL_ERROR_LIMIT,
    STEP_COSINE,
    THRESHOLDS,
    TRACE_AGREES_RANGE,
    TRACE_RATIO_RANGE,
)

#: Verdict levels, worst first.
LEVELS = ("bad", "mixed", "insufficient", "good")
TOPICS = ("preconditioning", "matrix", "scale", "trace", "optimizer")


class Code(str):
    """A part of a verdict shown as code (a layer name): escaped, never interpreted."""


@dataclass
class Verdict:
    """One sentence of the report.

    Attributes:
        topic: One of :data:`TOPICS`.
        level: ``"bad"``, ``"mixed"``, ``"good"`` or ``"insufficient"``.
        parts: The sentence as text and :class:`Code` parts (user names are code).
        numbers: The numbers behind the sentence (stable keys).
    """

    topic: str
    level: str
    parts: list[str]
    numbers: dict[str, float | int | str | None] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The sentence as plain text, code parts in backticks."""
        return "".join(f"`{part}`" if isinstance(part, Code) else part for part in self.parts)

    def as_dict(self) -> dict:
        """Plain data for JSON."""
        return {
            "topic": self.topic,
            "level": self.level,
            "text": self.text,
            "numbers": dict(self.numbers),
        }


# ---------------------------------------------------------------- phrases


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def share_phrase(hits: int, count: int, noun: str = "measurement") -> str:
    """``"in 1 of 3 measurements"``, ``"in 12% of 240 measurements"``, ``"in all 7 ..."``."""
    if count == 1:
        return f"in {'the' if hits else 'not even the'} one {noun}"
    if hits == count:
        return f"in all {count} {noun}s"
    if hits == 0:
        return f"in none of the {count} {noun}s"
    if count < 20:
        return f"in {hits} of {count} {noun}s"
    return f"in {100 * hits / count:.0f}% of {count} {noun}s"


def range_phrase(values: np.ndarray, digits: str = ".3g") -> str:
    """``"was 1.03"`` for one value, else ``"ranged from 1.03 to 1.07 (median 1.05)"``."""
    if len(values) == 1:
        return f"was {values[0]:{digits}}"
    low, high = float(np.min(values)), float(np.max(values))
    if f"{low:{digits}}" == f"{high:{digits}}":
        return f"was {low:{digits}} in every measurement"
    return f"ranged from {low:{digits}} to {high:{digits}} (median {np.median(values):{digits}})"


def _median_phrase(values: np.ndarray, digits: str = ".2f") -> str:
    return f"{values[0]:{digits}}" if len(values) == 1 else f"median {np.median(values):{digits}}"


def _finite_series(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    steps, values = run.series(key)
    keep = np.isfinite(values)
    return steps[keep], values[keep]


def _steps_phrase(steps: np.ndarray) -> str:
    if len(steps) == 1:
        return f"at step {steps[0]}"
    return f"at steps {steps[0]}–{steps[-1]}"


# ---------------------------------------------------------------- evidence

MEASURE_MORE = (
    "measure more often: use FisherMonitor(schedule=schedules.budget(fraction=0.2)) to let "
    "the monitor take up to 20% of the fit time, or every_n_steps=N with N well below the "
    "run's length, or train longer"
)


MEASURE_BRIEFLY = (
    f"measure at least {MIN_MEASUREMENTS} times during training: use a larger budget "
    "(schedules.budget(fraction=0.2)), a smaller every_n_steps, or a longer run"
)


def evidence(steps: np.ndarray) -> str | None:
    """Why measurements at ``steps`` are not enough evidence (``None`` when they are)."""
    if len(steps) == 0:
        return "no measurement"
    if not np.any(steps > 0):
        where = "at step 0" if len(steps) == 1 else "all at step 0"
        return f"{_plural(len(steps), 'measurement')}, {where}, before any training step"
    if len(steps) < MIN_MEASUREMENTS:
        return (
            f"only {_plural(len(steps), 'measurement')} ({_steps_phrase(steps)}; "
            f"at least {MIN_MEASUREMENTS} are needed)"
        )
    return None


def _insufficient(topic: str, what: str, why: str, known: list[str], numbers: dict) -> Verdict:
    parts = [f"Insufficient evidence on {what}: {why}"]
    parts += ["; so far ", *known] if known else []
    parts += [f". To judge, {MEASURE_BRIEFLY}."]
    return Verdict(topic, "insufficient", parts, {**numbers, "insufficient": why})


# ---------------------------------------------------------------- layers


def layer_medians(run: Run, metric: str = "direction_cosine") -> dict[str, float]:
    """Per layer, the median of ``metric`` over the run (layers without values left out)."""
    medians = {}
    for layer in run.layers:
        values = run.series(run.key(metric, layer))[1]
        values = values[np.isfinite(values)]
        if len(values):
            medians[layer] = float(np.median(values))
    return medians


def worst_layer(run: Run) -> tuple[str, float]:
    """The layer with the lowest median direction cosine, and that median."""
    medians = layer_medians(run)
    if not medians:
        return keys.ALL, float("nan")
    layer = min(medians, key=medians.get)
    return layer, medians[layer]


def worst_step(run: Run) -> int:
    """The step with the lowest whole-network direction cosine (last step if none)."""
    steps, values = _finite_series(run, run.key("direction_cosine"))
    if not len(values):
        return run.steps[-1]
    return int(steps[np.argmin(values)])


# ---------------------------------------------------------------- topics


def _preconditioning(run: Run) -> Verdict | None:
    steps, cosines = _finite_series(run, run.key("direction_cosine"))
    if not len(cosines):
        return None
    structure = run.primary_structure
    count = len(cosines)
    disagree = int(np.sum(cosines < DISAGREE_COSINE))
    agree = int(np.sum(cosines >= AGREE_COSINE))
    median = float(np.median(cosines))
    layer, layer_median = worst_layer(run)
    numbers = {
        "structure": structure,
        "measurements": count,
        "disagree_share": disagree / count,
        "agree_share": agree / count,
        "median_direction_cosine": median,
        "worst_layer": layer,
        "worst_layer_median_direction_cosine": layer_median,
    }
    why = evidence(steps)
    if why is not None:
        known = [f"the cosine between the natural gradient and the EF step {range_phrase(cosines)}"]
        return _insufficient("preconditioning", "EF preconditioning", why, known, numbers)
    where = (
        ["worst in layer ", Code(layer), f" (median {layer_median:.2f})"]
        if layer != keys.ALL
        else []
    )
    head = f"(median cosine {median:.2f}, {structure})"
    if disagree / count >= DISAGREE_SHARE:
        parts = [
            f"The EF-preconditioned step pointed away from the natural gradient (cosine < "
            f"{DISAGREE_COSINE}) {share_phrase(disagree, count)} {head}",
            *([", ", *where] if where else []),
            ": do not precondition with the EF here; use the Fisher (an MC-sampled Fisher or "
            "K-FAC) or damp the EF strongly.",
        ]
        return Verdict("preconditioning", "bad", parts, numbers)
    if agree / count >= AGREE_SHARE:
        parts = [
            f"The EF-preconditioned step agreed with the natural gradient (cosine ≥ "
            f"{AGREE_COSINE}) {share_phrase(agree, count)} {head}",
            *([", ", *where] if where else []),
            ": EF preconditioning is a fair stand-in for natural-gradient steps here; no change "
            "needed, but measure again after changing the model, the data or the loss.",
        ]
        return Verdict("preconditioning", "good", parts, numbers)
    parts = [
        f"The EF-preconditioned step agreed with the natural gradient (cosine ≥ {AGREE_COSINE}) "
        f"{share_phrase(agree, count)} and disagreed (cosine < {DISAGREE_COSINE}) "
        f"{share_phrase(disagree, count)} {head}",
        *([", ", *where] if where else []),
        ": EF preconditioning is a partial stand-in; precondition with the Fisher (or damp "
        "more) where the heat map is red.",
    ]
    return Verdict("preconditioning", "mixed", parts, numbers)


def _matrix(run: Run) -> Verdict | None:
    steps, errors = _finite_series(run, run.key("rel_error"))
    if not len(errors):
        return None
    kls = _finite_series(run, run.key("kl"))[1]
    structure = run.primary_structure
    median_error = float(np.median(errors))
    above = int(np.sum(errors > REL_ERROR_LIMIT))
    median_kl = float(np.median(kls)) if len(kls) else float("nan")
    numbers = {
        "measurements": len(errors),
        "median_rel_error": median_error,
        "rel_error_above_share": above / len(errors),
        "median_kl": median_kl,
    }
    why = evidence(steps)
    if why is not None:
        known = [f"the relative Frobenius error of the EF {range_phrase(errors)}"]
        if len(kls):
            known.append(f" and the KL between the Laplace approximations {range_phrase(kls)}")
        return _insufficient("matrix", "the EF as a matrix", why, known, numbers)
    kl_text = (
        f"; the KL divergence between the two Laplace approximations had median "
        f"{median_kl:.3g} nats"
        if len(kls)
        else ""
    )
    level = "bad" if median_error > REL_ERROR_LIMIT else "good"
    text = (
        f"As matrices, EF and F differed by {100 * median_error:.0f}% in the median (relative "
        f"Frobenius error, {structure}; above {REL_ERROR_LIMIT} "
        f"{share_phrase(above, len(errors))}){kl_text}: "
    )
    if level == "bad":
        text += (
            "do not trust EF-based Laplace variances, TIC or other uncertainty built on the EF; "
            "use the Fisher (the GGN) instead."
        )
    else:
        text += (
            "the EF is a usable stand-in for the Fisher as a matrix here; before using "
            "EF-based Laplace variances, check that the KL is small for your purpose (0 means "
            "identical)."
        )
    return Verdict("matrix", level, [text], numbers)


def _scale(run: Run) -> Verdict | None:
    steps, ratios = _finite_series(run, run.key("trace_ratio"))
    if not len(ratios):
        return None
    low, high = TRACE_RATIO_RANGE
    median = float(np.median(ratios))
    outside = int(np.sum((ratios < low) | (ratios > high)))
    numbers = {
        "measurements": len(ratios),
        "median_trace_ratio": median,
        "min_trace_ratio": float(ratios.min()),
        "max_trace_ratio": float(ratios.max()),
        "outside_share": outside / len(ratios),
    }
    why = evidence(steps)
    if why is not None:
        known = [f"tr EF / tr F {range_phrase(ratios)}"]
        return _insufficient("scale", "the curvature scale", why, known, numbers)
    text = (
        f"tr EF / tr F {range_phrase(ratios)}; it left [{low}, {high}] "
        f"{share_phrase(outside, len(ratios))}: "
    )
    if low <= median <= high:
        text += (
            "the EF's overall curvature scale is about right; damping or step sizes calibrated "
            "on EF magnitudes are safe here."
        )
        return Verdict("scale", "good", [text], numbers)
    direction = "overstates" if median > high else "understates"
    text += (
        f"the EF {direction} the curvature scale; do not set damping, Adam's ε or learning "
        "rates from EF magnitudes, and check the data scale and that the loss is a true "
        "negative log-likelihood (its reduction and any scaling factor)."
    )
    return Verdict("scale", "bad", [text], numbers)


def _trace(run: Run) -> Verdict | None:
    steps, ratios = _finite_series(run, run.key("trace_ratio"))
    errors = _finite_series(run, run.key("rel_error"))[1]
    if not len(ratios) or not len(errors):
        return None
    median_ratio, median_error = float(np.median(ratios)), float(np.median(errors))
    numbers = {"median_trace_ratio": median_ratio, "median_rel_error": median_error}
    why = evidence(steps)
    if why is not None:
        known = [
            f"tr EF / tr F {range_phrase(ratios)} and the relative error {range_phrase(errors)}"
        ]
        return _insufficient("trace", "whether the trace hides a mismatch", why, known, numbers)
    low, high = TRACE_AGREES_RANGE
    traces_agree = low <= median_ratio <= high
    if traces_agree and median_error > REL_ERROR_LIMIT:
        text = (
            f"The trace hides a mismatch: the traces agreed (median ratio {median_ratio:.2f}) "
            f"while the matrices did not (median relative error {median_error:.2f}): do not "
            "validate the EF by its trace or any other scalar summary; compare directions and "
            "whole matrices, as this report does."
        )
        return Verdict("trace", "bad", [text], numbers)
    if traces_agree:
        story = (
            f"the traces agreed (median ratio {median_ratio:.2f}) and so did the matrices "
            f"(median relative error {median_error:.2f})"
        )
    elif median_error > REL_ERROR_LIMIT:
        story = (
            f"the trace ratio (median {median_ratio:.2f}) already shows the mismatch of the "
            f"matrices (median relative error {median_error:.2f})"
        )
    else:
        story = (
            f"the traces differ (median ratio {median_ratio:.2f}) while the matrices are close "
            f"in shape (median relative error {median_error:.2f})"
        )
    text = (
        f"The trace does not hide a mismatch here: {story}; still judge the EF by its "
        "directions and matrix error, never by the trace alone."
    )
    return Verdict("trace", "good", [text], numbers)


def _optimizer(run: Run) -> Verdict | None:
    if not run.has_update_audit:
        return None
    steps, cosines = _finite_series(run, run.key("update_nat_cosine"))
    if not len(cosines):
        return None
    name = run.optimizer_name
    owner = f"{name}'s" if name else "The optimizer's"
    ef_steps = _finite_series(run, run.key("update_ef_cosine"))[1]
    grad_steps = _finite_series(run, run.key("update_grad_cosine"))[1]
    with_ef = _finite_series(run, keys.optimizer_key("preconditioner_ef_cosine", keys.ALL))[1]
    with_f = _finite_series(run, keys.optimizer_key("preconditioner_fisher_cosine", keys.ALL))[1]
    count = len(cosines)
    within = int(np.sum(cosines >= STEP_COSINE))
    numbers: dict = {
        "optimizer": name,
        "structure": run.primary_structure,
        "measurements": count,
        "within_60_degrees_share": within / count,
        "median_update_nat_cosine": float(np.median(cosines)),
        "median_update_ef_cosine": float(np.median(ef_steps)) if len(ef_steps) else None,
        "median_update_grad_cosine": float(np.median(grad_steps)) if len(grad_steps) else None,
        "median_preconditioner_ef_cosine": float(np.median(with_ef)) if len(with_ef) else None,
        "median_preconditioner_fisher_cosine": float(np.median(with_f)) if len(with_f) else None,
    }
    why = evidence(steps)
    if why is not None:
        known = [
            f"the cosine between {f'{name}' if name else 'the optimizer'}'s step and the "
            f"natural-gradient step {range_phrase(cosines)}"
        ]
        return _insufficient("optimizer", "the optimizer's steps", why, known, numbers)
    text = (
        f"{owner} steps pointed within 60° of the natural gradient (cosine ≥ {STEP_COSINE}) "
        f"{share_phrase(within, count)} (median cosine {np.median(cosines):.2f}"
    )
    if len(ef_steps):
        text += f"; with the EF-preconditioned step {_median_phrase(ef_steps)}"
    if len(grad_steps):
        text += f"; with −g {_median_phrase(grad_steps)}"
    text += ")"
    follows, phrase = _preconditioner_follows(with_ef, with_f)
    text += phrase
    numbers["follows"] = follows
    share = within / count
    level = "good" if share >= AGREE_SHARE else "bad" if share < DISAGREE_SHARE else "mixed"
    plain = len(grad_steps) and np.median(grad_steps) >= AGREE_COSINE
    advice = _optimizer_advice(level, bool(plain), follows)
    return Verdict("optimizer", level, [f"{text}: {advice}"], numbers)


def _preconditioner_follows(with_ef: np.ndarray, with_f: np.ndarray) -> tuple[str | None, str]:
    """Which diagonal the optimizer's preconditioner follows, and the clause saying so.

    ``"ef"`` or ``"fisher"`` when its median cosine with √diag EF (resp. √diag F) exceeds
    the other's by more than ``FOLLOWS_MARGIN``, else ``"both"``; ``None`` (and no clause)
    when the preconditioner was not audited.
    """
    if not (len(with_ef) and len(with_f)):
        return None, ""
    ef_median, f_median = float(np.median(with_ef)), float(np.median(with_f))
    phrase = (
        f"; its preconditioner correlates with √diag EF at {ef_median:.2f} and with "
        f"√diag F at {f_median:.2f}"
    )
    if ef_median > f_median + FOLLOWS_MARGIN:
        return "ef", phrase + " — it follows the EF"
    if f_median > ef_median + FOLLOWS_MARGIN:
        return "fisher", phrase + " — it follows the Fisher"
    return "both", phrase + " — about equally"


def _optimizer_advice(level: str, plain: bool, follows: str | None) -> str:
    """What to change about the optimizer.

    Args:
        level: The verdict's level (``"good"``, ``"mixed"`` or ``"bad"``).
        plain: Whether its steps are close to plain gradient steps (median cosine with
            −g at least ``AGREE_COSINE``).
        follows: Which diagonal its preconditioner follows (:func:`_preconditioner_follows`).
    """
    if level == "good":
        return "no change needed: its steps are close to natural-gradient steps."
    if plain and follows is None:
        return (
            "its steps are close to plain gradient steps; for natural-gradient-like steps "
            "precondition with the Fisher (K-FAC or a damped diagonal Fisher)."
        )
    if follows == "ef":
        return (
            "its diagonal scaling inherits the EF's errors; for natural-gradient-like steps "
            "precondition with the Fisher (K-FAC or a damped diagonal Fisher with sampled "
            "labels), or raise ε to soften the EF scaling."
        )
    return (
        "its steps leave the natural gradient; check what dominates the update (momentum, "
        "weight decay, gradient clipping) and consider a Fisher-based preconditioner."
    )


def verdicts(run: Run) -> list[Verdict]:
    """Every verdict for a run, headline (preconditioning) first."""
    found = [
        _preconditioning(run),
        _matrix(run),
        _scale(run),
        _trace(run),
        _optimizer(run),
    ]
    return [verdict for verdict in found if verdict is not None]


def headline(run: Run) -> Verdict | None:
    """The first (preconditioning) verdict, or ``None`` when nothing was measured."""
    found = verdicts(run)
    return found[0] if found else None


def advice(run: Run, found: list[Verdict] | None = None) -> list[str]:
    """What to change in the monitor's settings for better evidence (may be empty)."""
    found = verdicts(run) if found is None else found
    tips = []
    if any(verdict.level == "insufficient" for verdict in found):
        steps = np.asarray(run.steps)
        tips.append(
            f"This run has {_plural(len(steps), 'measurement')} ({_steps_phrase(steps)}): "
            f"{MEASURE_MORE}."
        )
        sizes = _finite_series(run, keys.probe_key("batch_size"))[1]
        if len(sizes) and np.median(sizes) < 32:
            tips.append(
                f"The probe batch had {np.median(sizes):.0f} samples: a larger probe "
                "(probe_size=None and a larger batch, or a fixed probe_data set of a few "
                "hundred samples) makes every measurement less noisy."
            )
        elif not len(sizes):
            tips.append(
                "A fixed probe set (probe_data=...) of a few hundred samples makes "
                "measurements comparable across steps."
            )
    return tips


__all__ = [
    "LEVELS",
    "THRESHOLDS",
    "TOPICS",
    "Code",
    "Verdict",
    "advice",
    "evidence",
    "headline",
    "layer_medians",
    "range_phrase",
    "share_phrase",
    "verdicts",
    "worst_layer",
    "worst_step",
]
