"""Verdicts: plain sentences about a run, with their numbers, what to do, and links.

The links lead to the documentation that explains the terms (``docs/glossary.md``) and
how to act (``docs/guide/acting.md``).

A run gets a **headline** (:func:`headline`, from :mod:`fisher_monitor.report.headline`):
one line on what the measurements mean for the training at hand — its optimizer (Adam
and other adaptive methods, SGD, a K-FAC/Shampoo-style preconditioner) or a Laplace /
uncertainty use — and one verdict per topic (:func:`verdicts`). The thresholds live in
:mod:`fisher_monitor.report.thresholds` (and are printed in every report); the outcomes
they define are computed once per run (:mod:`fisher_monitor.report.evidence`), so two
verdicts never read the same numbers differently:

- *preconditioning*: the EF direction *disagrees* with the natural gradient when
  ``direction_cosine < 0.5`` and *agrees* when ``≥ 0.9``; bad when it disagrees in at
  least half of the measurements, good when it agrees in at least 90%, mixed otherwise;
- *matrix*: median ``rel_error`` above 0.5 bad, up to 0.1 good (a close stand-in),
  mixed between (a rough one);
- *scale*: median ``trace_ratio`` outside ``[0.5, 2]`` bad; inside ``[0.8, 1.25]`` good
  unless the matrices differ (then mixed: only the overall scale carries over); mixed
  between the two ranges;
- *trace*: bad when the traces match (``[0.8, 1.25]``) while the matrices differ (the
  paper's warning that traces alone mislead); good when both match; otherwise a note
  saying what the trace shows (never "good" beside a matrix mismatch);
- *optimizer* (when the optimizer's steps were audited): its steps point *within 60°* of
  the natural gradient when ``update_nat_cosine ≥ 0.5``; good in at least 90% of the
  measurements; otherwise a note (for Adam or SGD a distance from the natural gradient is
  no fault), except for a curvature preconditioner (K-FAC style), bad in under half.

Each topic uses what was measured: the first structure (block, kron, diag) that logged
its metric, named in the sentence with the reason when it is not the run's primary one;
a topic nothing was measured for says so instead of disappearing. Every topic needs
evidence: with fewer than 5 measurements, or none after a training step, its verdict is
*insufficient evidence*, with what is known as numbers and what to change. Numbers are of
the whole network (``all``) at the first damping; medians are over the measurements.
"""

from __future__ import annotations

import numpy as np

from fisher_monitor import keys
from fisher_monitor.report.evidence import (
    LEVELS,
    MAKE_FINITE,
    MEASURE_MORE,
    Assessment,
    Code,
    Measured,
    Verdict,
    assess,
    evidence,
    measured,
    measured_steps,
    median_phrase,
    plural,
    range_phrase,
    share_phrase,
    steps_phrase,
)
from fisher_monitor.report.headline import USES, check_use, headline_verdict, infer_use
from fisher_monitor.report.runs import Run
from fisher_monitor.report.thresholds import (
    AGREE_COSINE,
    AGREE_SHARE,
    DISAGREE_COSINE,
    DISAGREE_SHARE,
    REL_ERROR_LIMIT,
    STEP_COSINE,
    THRESHOLDS,
    TRACE_RATIO_RANGE,
)

TOPICS = ("preconditioning", "matrix", "scale", "trace", "optimizer")
#: The topic name of :func:`headline`'s verdict.
HEADLINE = "headline"


def _insufficient(
    topic: str, what: str, m: Measured, known: list[str], numbers: dict, links: list[str]
) -> Verdict:
    why = m.why_insufficient
    parts = [f"Insufficient evidence on {what}: {why}"]
    parts += ["; so far ", *known] if known else []
    parts += [f". To judge, {m.advice}."]
    numbers = {**numbers, "insufficient": why, "non_finite": m.logged - len(m.steps)}
    return Verdict(topic, "insufficient", parts, numbers, links)


def _not_measured(topic: str, what: str, metric: str, links: list[str]) -> Verdict:
    text = (
        f"No verdict on {what}: no structure logged {metric} in this run (a sketched Fisher "
        "logs no damped metrics, and a structure left out of `structures` logs nothing; the "
        "notes say which). To judge it, measure a structure with an exact Fisher, e.g. "
        "FisherMonitor(structures=('diag', 'block'))."
    )
    return Verdict(topic, "insufficient", [text], {"not_measured": metric}, links)


# ---------------------------------------------------------------- layers


def layer_medians(
    run: Run, metric: str = "direction_cosine", structure: str | None = None
) -> dict[str, float]:
    """Per layer, the median of ``metric`` over the run (layers without values left out).

    Args:
        run: The run.
        metric: The metric.
        structure: The structure (default: the run's primary one).
    """
    medians = {}
    for layer in run.layers:
        values = run.series(run.key(metric, layer, structure=structure))[1]
        values = values[np.isfinite(values)]
        if len(values):
            medians[layer] = float(np.median(values))
    return medians


def worst_layer(run: Run, structure: str | None = None) -> tuple[str, float]:
    """The layer with the lowest median direction cosine, and that median."""
    medians = layer_medians(run, structure=structure)
    if not medians:
        return keys.ALL, float("nan")
    layer = min(medians, key=medians.get)
    return layer, medians[layer]


def worst_step(run: Run) -> int:
    """The step with the lowest whole-network direction cosine (last step if none)."""
    found = measured(run, "direction_cosine")
    if found is None:
        steps = run.steps or [int(s) for s in measured_steps(run)]
        return int(steps[-1])
    return int(found.steps[np.argmin(found.values)])


# ---------------------------------------------------------------- topics


def _preconditioning(a: Assessment) -> Verdict:
    links = ["docs/guide/acting.md#preconditioner", "docs/glossary.md#direction-cosine"]
    m = a.direction
    if m is None:
        return _not_measured("preconditioning", "EF preconditioning", "direction_cosine", links)
    cosines, count = m.values, len(m.values)
    disagree = int(np.sum(cosines < DISAGREE_COSINE))
    agree = int(np.sum(cosines >= AGREE_COSINE))
    layer, layer_median = worst_layer(a.run, m.structure)
    numbers = {
        "structure": m.structure,
        "measurements": count,
        "disagree_share": disagree / count,
        "agree_share": agree / count,
        "median_direction_cosine": m.median,
        "worst_layer": layer,
        "worst_layer_median_direction_cosine": layer_median,
        "outcome": a.direction_outcome,
    }
    if m.why_insufficient is not None:
        known = [f"the cosine between the natural gradient and the EF step {range_phrase(cosines)}"]
        return _insufficient("preconditioning", "EF preconditioning", m, known, numbers, links)
    where = [", worst in layer ", Code(layer), f" (median {layer_median:.2f})"]
    where = where if layer != keys.ALL else []
    head = f"(median cosine {m.median:.2f}, {m.where()})"
    if a.direction_outcome == "disagree":
        first = (
            f"The EF-preconditioned step pointed away from the natural gradient (cosine < "
            f"{DISAGREE_COSINE}) {share_phrase(disagree, count)} {head}"
        )
        action = (
            ": a preconditioner built from the EF (an EF natural gradient, 'empirical' K-FAC, "
            "Shampoo-style gradient outer products) would not take natural-gradient steps "
            "here; where you use one, build it from the Fisher (labels sampled from the model, "
            "as K-FAC does) or damp it strongly."
        )
        return Verdict("preconditioning", "bad", [first, *where, action], numbers, links)
    if a.direction_outcome == "agree":
        first = (
            f"The EF-preconditioned step agreed with the natural gradient (cosine ≥ "
            f"{AGREE_COSINE}) {share_phrase(agree, count)} {head}"
        )
        action = (
            ": EF preconditioning is a fair stand-in for natural-gradient steps here, at this "
            "damping; no change needed, but measure again after changing the model, the data "
            "or the loss."
        )
        return Verdict("preconditioning", "good", [first, *where, action], numbers, links)
    first = (
        f"The EF-preconditioned step agreed with the natural gradient (cosine ≥ {AGREE_COSINE}) "
        f"{share_phrase(agree, count)} and disagreed (cosine < {DISAGREE_COSINE}) "
        f"{share_phrase(disagree, count)} {head}"
    )
    action = (
        ": EF preconditioning is a partial stand-in; where you precondition with the EF, use "
        "the Fisher (or damp more) for the layers and steps the heat map shows red."
    )
    return Verdict("preconditioning", "mixed", [first, *where, action], numbers, links)


def _matrix(a: Assessment) -> Verdict:
    links = ["docs/guide/acting.md#laplace", "docs/glossary.md#rel-error"]
    m = a.error
    if m is None:
        return _not_measured("matrix", "the EF as a matrix", "rel_error", links)
    kls = a.kl.values if a.kl is not None else np.zeros(0)
    above = int(np.sum(m.values > REL_ERROR_LIMIT))
    median_kl = float(np.median(kls)) if len(kls) else float("nan")
    numbers = {
        "structure": m.structure,
        "measurements": len(m.values),
        "median_rel_error": m.median,
        "rel_error_above_share": above / len(m.values),
        "median_kl": median_kl,
        "outcome": a.matrix_outcome,
    }
    if m.why_insufficient is not None:
        known = [f"the relative Frobenius error of the EF {range_phrase(m.values)}"]
        if len(kls):
            known.append(f" and the KL between the Laplace approximations {range_phrase(kls)}")
        return _insufficient("matrix", "the EF as a matrix", m, known, numbers, links)
    kl_text = (
        f"; the KL divergence between the two Laplace approximations had median "
        f"{median_kl:.3g} nats"
        if len(kls)
        else ""
    )
    text = (
        f"As matrices, EF and F differed by {100 * m.median:.0f}% in the median (relative "
        f"Frobenius error, {m.where()}; above {REL_ERROR_LIMIT} "
        f"{share_phrase(above, len(m.values))}){kl_text}: "
    )
    if a.matrix_outcome == "differ":
        text += (
            "do not trust EF-based Laplace variances, TIC or other uncertainty built on the "
            "EF; build them on the Fisher (the GGN) instead."
        )
        return Verdict("matrix", "bad", [text], numbers, links)
    if a.matrix_outcome == "close":
        text += (
            "the EF is a close stand-in for the Fisher as a matrix here, so EF-based Laplace "
            "variances are close to the Fisher's; no change needed."
        )
        return Verdict("matrix", "good", [text], numbers, links)
    text += (
        "the EF is a rough stand-in for the Fisher as a matrix; for Laplace variances or TIC "
        "you rely on, use the Fisher (the GGN)."
    )
    return Verdict("matrix", "mixed", [text], numbers, links)


def _noise_variance(a: Assessment) -> str:
    """For ``MSELoss``: the Gaussian noise variance the loss implies, against the residuals'."""
    loss = a.loss_name
    if not loss.startswith("MSELoss"):
        return ""
    mean = "'sum'" not in loss
    variance = (
        "K/2 per output entry (½ with one output per sample; K counts a sample's entries)"
        if mean
        else "½ per output entry"
    )
    text = (
        f" {loss} is the negative log-likelihood of Gaussian noise of variance {variance}: the "
        "Fisher assumes that noise while the EF sees your residuals, so tr EF / tr F ≈ "
        "(mean squared residual per entry) / (that variance) when residuals and gradients are "
        "unrelated."
    )
    if mean and len(a.loss):
        mse = float(np.median(a.loss))
        text += (
            f" Your probe loss, the mean squared residual, had median {mse:.3g}: against the "
            f"implied variance ½ that predicts a ratio near 2 × {mse:.3g} = {2 * mse:.3g} for "
            "one output per sample."
        )
    return text + (
        " A ratio far from 1 then says your residuals' variance is not the one the loss "
        "implies, not that the data are badly scaled: compare your residuals' variance with "
        "the loss's, not the data's scaling."
    )


def _scale_cause(a: Assessment, outcome: str) -> str:
    """Why the scale is off, as far as the loss tells."""
    noise = _noise_variance(a)
    if noise:
        return noise
    if outcome == "low":
        classifier = "For a classifier" if a.loss_name else "For a classifier (cross-entropy)"
        return (
            f" {classifier} this is expected once it fits its training data (the EF sees the "
            "small gradients of labels it already predicts, the Fisher the model's own label "
            "noise), so use the Fisher's scale wherever you need one."
        )
    return (
        " Outliers, mislabelled samples or a loss scaled beyond its likelihood (a weight, a "
        "sum where a mean is meant) raise the EF's scale; check that the loss is a true "
        "negative log-likelihood."
    )


def _scale(a: Assessment) -> Verdict:
    links = ["docs/guide/acting.md#scale", "docs/glossary.md#trace-ratio"]
    m = a.ratio
    if m is None:
        return _not_measured("scale", "the curvature scale", "trace_ratio", links)
    low, high = TRACE_RATIO_RANGE
    outside = int(np.sum((m.values < low) | (m.values > high)))
    outcome = a.scale_outcome
    numbers = {
        "structure": m.structure,
        "measurements": len(m.values),
        "median_trace_ratio": m.median,
        "min_trace_ratio": float(m.values.min()),
        "max_trace_ratio": float(m.values.max()),
        "outside_share": outside / len(m.values),
        "outcome": outcome,
    }
    if a.loss_name.startswith("MSELoss"):
        links.append("docs/guide/acting.md#gaussian-noise")
    if m.why_insufficient is not None:
        known = [f"tr EF / tr F {range_phrase(m.values)}"]
        return _insufficient("scale", "the curvature scale", m, known, numbers, links)
    text = (
        f"tr EF / tr F ({m.where()}) {range_phrase(m.values)}; it left [{low}, {high}] "
        f"{share_phrase(outside, len(m.values))}: "
    )
    direction = "overstates" if m.median > 1 else "understates"
    if outcome == "match" and a.matrix_outcome == "differ":
        text += (
            "the EF's overall curvature scale matches the Fisher's, but the matrices differ "
            "(see the trace verdict): only a scale for all coordinates together (a global "
            "damping) carries over from EF magnitudes, per-coordinate magnitudes do not."
        )
        return Verdict("scale", "mixed", [text], numbers, links)
    if outcome == "match":
        text += (
            "the EF's overall curvature scale matches the Fisher's; scalar settings taken from "
            "EF magnitudes (a global damping, a step size) carry over, no change needed."
        )
        return Verdict("scale", "good", [text], numbers, links)
    if outcome == "near":
        off = 100 * abs(m.median - 1)
        text += (
            f"the EF {direction} the overall curvature scale by about {off:.0f}% (within a "
            "factor of 2): settings calibrated on EF magnitudes (damping, Adam's ε, a step "
            "size) are off by that much; use the Fisher's where that matters."
        )
        return Verdict("scale", "mixed", [text], numbers, links)
    factor = m.median if m.median > 1 else 1 / m.median
    text += (
        f"the EF {direction} the curvature scale (by a factor of about {factor:.3g}); do not "
        "set damping, Adam's ε, learning rates or a Laplace approximation's scale from EF "
        "magnitudes." + _scale_cause(a, outcome)
    )
    return Verdict("scale", "bad", [text], numbers, links)


def _trace(a: Assessment) -> Verdict | None:
    ratio, error = a.ratio, a.error
    if ratio is None or error is None:
        return None  # the scale or matrix verdict says what was not measured
    links = ["docs/guide/acting.md#trace", "docs/glossary.md#trace-ratio"]
    r, e = ratio.median, error.median
    scale, matrix = a.scale_outcome, a.matrix_outcome
    numbers = {
        "median_trace_ratio": r,
        "median_rel_error": e,
        "scale_outcome": scale,
        "matrix_outcome": matrix,
    }
    short = ratio if ratio.why_insufficient is not None else error
    if short.why_insufficient is not None:
        known = [
            f"tr EF / tr F {range_phrase(ratio.values)} and the relative error "
            f"{range_phrase(error.values)}"
        ]
        what = "whether the trace hides a mismatch"
        return _insufficient("trace", what, short, known, numbers, links)
    pair = f"(median trace ratio {r:.2f}, median relative error {e:.2f})"
    if scale == "match" and matrix == "differ":
        text = (
            f"The trace hides a mismatch: the traces agree while the matrices do not {pair}: "
            "do not validate the EF by its trace or any other scalar summary; compare "
            "directions and whole matrices, as this report does."
        )
        return Verdict("trace", "bad", [text], numbers, links)
    if scale == "match":
        text = (
            f"The trace tells the truth here: the traces agree and so do the matrices {pair}; "
            "no change needed, but judge a preconditioner by its directions (the "
            "preconditioning verdict), never by the trace alone."
        )
        return Verdict("trace", "good", [text], numbers, links)
    if matrix == "differ":
        story = (
            "is off by less than the matrices differ: it understates the mismatch"
            if scale == "near"
            else "shows the mismatch that the matrices' error confirms"
        )
        text = f"The trace does not hide the mismatch here: the trace ratio {story} {pair}"
    else:
        text = (
            f"The traces differ while the matrices are within {100 * REL_ERROR_LIMIT:.0f}% of "
            f"each other {pair}: mostly a difference of scale"
        )
    text += "; judge the EF by its directions and matrix error, never by the trace alone."
    return Verdict("trace", "info", [text], numbers, links)


def _follows_phrase(a: Assessment) -> str:
    if a.follows is None:
        return ""
    assert a.with_ef is not None and a.with_f is not None
    return (
        f"; its scaling correlates with √diag EF at {a.with_ef.median:.2f} and with √diag F "
        f"at {a.with_f.median:.2f}"
    )


def _optimizer_advice(a: Assessment, level: str, use: str | None) -> str:
    """What the optimizer verdict tells the user to do (after its numbers)."""
    if level == "good":
        return ": its steps are close to natural-gradient steps; no change needed."
    if use == "kfac":
        return (
            ": for a curvature preconditioner its steps are far from natural-gradient steps; "
            "check what its curvature is built from (gradients at the observed labels give the "
            "EF: use labels sampled from the model), its damping and how often it is updated."
        )
    diag_close = a.diag_outcome == "agree"
    plain = a.update_grad is not None and a.update_grad.median >= AGREE_COSINE
    if a.follows is None and plain:
        return (
            ": they are close to plain gradient steps, which the natural gradient turns away "
            "from; no change needed for training — for curvature-aware steps, precondition "
            "with the Fisher (K-FAC with sampled labels), not the EF."
        )
    if a.follows == "fisher":
        return (
            " — closer to the Fisher's diagonal than to the EF's, so the EF is not what turns "
            "its steps away: a diagonal scaling cannot follow the natural gradient's couplings "
            "between parameters, and momentum, weight decay and clipping change the step too. "
            "No change needed in its scaling; for steps closer to the natural gradient, a block "
            "preconditioner (K-FAC with sampled labels) is the next thing to try."
        )
    if a.follows == "ef" and not diag_close:
        return (
            " — it scales coordinates like the EF's diagonal, which differs from the Fisher's "
            "here, so its step sizes inherit the EF's errors; if training does well, no change "
            "needed — for curvature-aware steps raise ε or precondition with the Fisher (K-FAC, "
            "or a damped diagonal Fisher with sampled labels)."
        )
    alike = " alike" if a.follows == "both" else ""
    return (
        f"{alike} — its distance from the natural gradient comes largely from what a diagonal "
        "scaling cannot express (couplings between parameters) and from momentum, weight decay "
        "or clipping; no change needed for training — for steps closer to the natural "
        "gradient, try a block preconditioner such as K-FAC with sampled labels."
    )


def _optimizer(a: Assessment, use: str | None) -> Verdict | None:
    m = a.update
    if m is None:
        return None
    name = a.optimizer
    section = {"adam": "adam", "sgd": "sgd", "kfac": "kfac"}.get(use or "", "optimizer")
    links = [f"docs/guide/acting.md#{section}", "docs/glossary.md#natural-gradient"]
    count = len(m.values)
    within = int(np.sum(m.values >= STEP_COSINE))
    share = within / count
    numbers: dict = {
        "optimizer": name,
        "structure": m.structure,
        "measurements": count,
        "within_60_degrees_share": share,
        "median_update_nat_cosine": m.median,
        "median_update_ef_cosine": a.update_ef.median if a.update_ef else None,
        "median_update_grad_cosine": a.update_grad.median if a.update_grad else None,
        "median_preconditioner_ef_cosine": a.with_ef.median if a.with_ef else None,
        "median_preconditioner_fisher_cosine": a.with_f.median if a.with_f else None,
        "follows": a.follows,
    }
    if m.why_insufficient is not None:
        known = [
            f"the cosine between {name or 'the optimizer'}'s step and the natural-gradient "
            f"step {range_phrase(m.values)}"
        ]
        return _insufficient("optimizer", "the optimizer's steps", m, known, numbers, links)
    owner = f"{name}'s" if name else "The optimizer's"
    text = (
        f"{owner} steps pointed within 60° of the natural gradient (cosine ≥ {STEP_COSINE}) "
        f"{share_phrase(within, count)} (median cosine {m.median:.2f}, {m.where()}"
    )
    if a.update_ef is not None:
        text += f"; with the EF-preconditioned step {median_phrase(a.update_ef.values)}"
    if a.update_grad is not None:
        text += f"; with −g {median_phrase(a.update_grad.values)}"
    text += ")" + _follows_phrase(a)
    if share >= AGREE_SHARE:
        level = "good"
    elif use == "kfac":
        level = "bad" if share < DISAGREE_SHARE else "mixed"
    else:  # an Adam or SGD step far from the natural gradient is no fault in itself
        level = "info"
    return Verdict("optimizer", level, [text + _optimizer_advice(a, level, use)], numbers, links)


# ---------------------------------------------------------------- the run


def verdicts(run: Run, use: str | None = None) -> list[Verdict]:
    """Every topic's verdict for a run, preconditioning first.

    Args:
        run: The run.
        use: How the user relies on curvature (:data:`USES`); default from the run's
            settings (``"use"``, else the optimizer's class).

    Returns:
        One verdict per topic with data (a topic whose metric no structure logged says so;
        the optimizer topic only when its steps were audited).
    """
    use = check_use(use) or infer_use(run.settings)
    a = assess(run)
    found = [_preconditioning(a), _matrix(a), _scale(a), _trace(a), _optimizer(a, use)]
    return [verdict for verdict in found if verdict is not None]


def headline(run: Run, use: str | None = None) -> Verdict:
    """One line on what the measurements mean for this training (topic ``"headline"``).

    It says what the numbers mean for the user's optimizer or use, what to try, and which
    documentation section explains how.

    Args:
        run: The run.
        use: ``"adam"``, ``"sgd"``, ``"kfac"`` or ``"laplace"`` (:data:`USES`); default
            from the run's settings (``"use"``, else the optimizer's class name).
    """
    return headline_verdict(assess(run), check_use(use) or infer_use(run.settings))


def advice(run: Run, found: list[Verdict] | None = None) -> list[str]:
    """What to change in the monitor's settings for better evidence (may be empty)."""
    found = verdicts(run) if found is None else found
    tips = []
    short = [verdict for verdict in found if verdict.numbers.get("insufficient")]
    non_finite = [v.topic for v in short if v.numbers.get("non_finite", 0) > 0]
    if non_finite:
        tips.append(
            f"Most values behind the {', '.join(non_finite)} "
            f"{'verdict was' if len(non_finite) == 1 else 'verdicts were'} NaN or infinite: "
            f"{MAKE_FINITE}."
        )
    if len(non_finite) < len(short):
        steps = measured_steps(run)
        tips.append(
            f"This run has {plural(len(steps), 'measurement')} ({steps_phrase(steps)}): "
            f"{MEASURE_MORE}."
        )
        sizes = run.series(keys.probe_key("batch_size"))[1]
        sizes = sizes[np.isfinite(sizes)]
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
    "HEADLINE",
    "LEVELS",
    "THRESHOLDS",
    "TOPICS",
    "USES",
    "Code",
    "Measured",
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
