"""The headline: one line on what the measurements mean for the training at hand.

The same gap between the EF and the Fisher matters differently depending on how the user
relies on curvature, so the headline is written for their *use*:

- ``"adam"``: an optimizer with a second moment (Adam, AdamW, RMSprop, Adagrad, …) scales
  coordinates by squared gradients, in effect the EF's diagonal: what counts is whether
  that diagonal (and the optimizer's own preconditioner) follows the Fisher's;
- ``"sgd"``: an optimizer without one (SGD, Lion, …) does not use the EF at all;
- ``"kfac"``: a curvature preconditioner (K-FAC, Shampoo, SOAP, an EF natural gradient)
  is hurt exactly when the EF-preconditioned direction leaves the natural gradient;
- ``"laplace"``: a Laplace approximation, TIC or another uncertainty built on the EF is
  hurt when the matrices and their scale differ.

The use comes from the ``use`` argument (the report's ``--use``), else the run's settings
(``"use"``, else the optimizer's class name the callback recorded); it cannot be inferred
for a Laplace or uncertainty use. Without any, the headline says what the numbers mean for
each use. Every headline links the documentation section on what to try
(``docs/guide/acting.md``) and the glossary.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fisher_monitor.report.evidence import (
    Assessment,
    Measured,
    Verdict,
    share_phrase,
)
from fisher_monitor.report.thresholds import AGREE_COSINE, DISAGREE_COSINE, STEP_COSINE

#: How the user relies on curvature (``fisher-monitor report --use``).
USES = ("adam", "sgd", "kfac", "laplace")
#: Optimizers with a second moment (lower-case class names), beside the callback's own
#: detection of such state (the ``preconditioner`` setting).
ADAPTIVE = frozenset(
    {
        "adam",
        "adamw",
        "nadam",
        "radam",
        "adamax",
        "adagrad",
        "adadelta",
        "rmsprop",
        "adafactor",
        "sparseadam",
        "lamb",
        "lars",
        "adabelief",
        "adan",
        "fusedadam",
        "adam8bit",
        "adamw8bit",
        "pagedadamw",
    }
)
#: Class names of curvature preconditioners (K-FAC, Shampoo, SOAP, natural gradient, …).
CURVATURE = re.compile(r"k-?fac|kfc|kflr|shampoo|soap|kron|psgd|natural|ngd|fisher", re.IGNORECASE)


def check_use(use: str | None) -> str | None:
    """``use`` if it is one of :data:`USES` (or ``None``), else a ``ValueError``."""
    if use is None or use in USES:
        return use
    raise ValueError(f"Invalid use: {use!r}. Supported: {USES} (or None to infer it).")


def infer_use(settings: Mapping[str, Any]) -> str | None:
    """The use from a run's settings: ``"use"``, else from the optimizer's class name.

    Returns:
        One of :data:`USES`, or ``None`` when nothing tells (no optimizer recorded).
    """
    use = settings.get("use")
    if use in USES:
        return str(use)
    name = str(settings.get("optimizer") or "")
    if not name or name == "None":
        return None
    if CURVATURE.search(name):
        return "kfac"
    if settings.get("preconditioner") in (True, "True") or name.lower() in ADAPTIVE:
        return "adam"
    return "sgd"


def _subject(a: Assessment, use: str) -> str:
    """What the headline is about: ``"your Adam training"``."""
    name = a.optimizer
    if name:
        return f"your {name} training"
    return {
        "adam": "a training with an Adam-like optimizer",
        "sgd": "a training with SGD",
        "kfac": "a K-FAC- or Shampoo-style preconditioner",
    }[use]


def _insufficient(m: Measured, what: str, use: str, links: list[str]) -> Verdict:
    why = m.why_insufficient
    text = f"Too few measurements to say what the EF/Fisher gap means {what} ({why}): "
    return Verdict(
        "headline",
        "insufficient",
        [text + m.advice + "."],
        {"use": use, "insufficient": why, "non_finite": m.logged - len(m.steps)},
        links,
    )


def _diagonal_phrase(a: Assessment) -> tuple[str, str]:
    """How the EF's diagonal compares with the Fisher's: a verb phrase and its numbers."""
    diag = a.diag_direction
    if diag is None:
        return "may differ from the Fisher's (no diagonal was measured)", ""
    count = len(diag.values)
    agree = share_phrase(int(np.sum(diag.values >= AGREE_COSINE)), count)
    disagree = share_phrase(int(np.sum(diag.values < DISAGREE_COSINE)), count)
    numbers = f"diag direction cosine: median {diag.median:.2f}"
    if a.diag_outcome == "agree":
        return "points like the Fisher's", f"{numbers}, ≥ {AGREE_COSINE} {agree}"
    if a.diag_outcome == "disagree":
        return "differs from the Fisher's", f"{numbers}, < {DISAGREE_COSINE} {disagree}"
    return "only partly follows the Fisher's", f"{numbers}, ≥ {AGREE_COSINE} {agree}"


def _scaling_phrase(a: Assessment) -> str:
    """The optimizer's own scaling against √diag F and √diag EF (empty when not audited)."""
    if a.with_f is None or a.with_ef is None:
        return ""
    alike = " alike" if a.follows == "both" else ""
    return (
        f"its scaling correlates with √diag F at {a.with_f.median:.2f} and with √diag EF at "
        f"{a.with_ef.median:.2f}{alike}"
    )


def _adam(a: Assessment) -> Verdict:
    links = ["docs/guide/acting.md#adam", "docs/glossary.md#ef"]
    name = a.optimizer or "the optimizer"
    subject, follows = _subject(a, "adam"), a.follows
    numbers = {"use": "adam", "optimizer": a.optimizer, "follows": follows}
    numbers["diag_outcome"] = a.diag_outcome
    source = a.diag_direction or a.with_f
    if source is None:
        text = (
            f"For {subject}: {name} scales coordinates by squared gradients, in effect the "
            "EF's diagonal, but this run measured no diagonal to compare it with the Fisher's; "
            "add 'diag' to FisherMonitor(structures=...) to learn whether that matters."
        )
        return Verdict("headline", "insufficient", [text], numbers, links)
    if source.why_insufficient is not None:
        return _insufficient(source, f"for {subject}", "adam", links)
    verb, diag_numbers = _diagonal_phrase(a)
    scaling = _scaling_phrase(a)
    if a.diag_outcome == "agree" and follows != "ef":
        text = (
            f"For {subject}: its squared-gradient scaling, the EF's diagonal in effect, "
            f"{verb} diagonal here ({diag_numbers}): the EF is not misleading {name}; no "
            "change needed."
        )
        return Verdict("headline", "good", [text], numbers, links)
    if follows == "fisher" or (a.diag_outcome == "agree" and follows == "ef"):
        text = (
            f"For {subject}: {scaling}, and the EF's diagonal {verb} diagonal ({diag_numbers}): "
            f"the EF's mismatch with the Fisher is not what shapes {name}'s steps; no change "
            f"needed for training — but do not reuse {name}'s squared gradients as curvature "
            "(uncertainty, pruning, damping)."
        )
        return Verdict("headline", "good", [text], numbers, links)
    scaling = f"; {scaling}" if scaling else ""
    text = (
        f"For {subject}: {name}'s squared-gradient scaling, the EF's diagonal in effect, {verb} "
        f"diagonal here ({diag_numbers}{scaling}), so its step sizes are not curvature step "
        f"sizes — how {name} works, not a fault: if your validation metric is fine, no change "
        "needed; to try curvature-aware steps, raise ε or use a Fisher-based preconditioner "
        "such as K-FAC."
    )
    return Verdict("headline", "mixed", [text], numbers, links)


def _sgd(a: Assessment) -> Verdict:
    links = ["docs/guide/acting.md#sgd", "docs/glossary.md#natural-gradient"]
    name = a.optimizer or "SGD"
    numbers: dict = {"use": "sgd", "optimizer": a.optimizer}
    text = (
        f"For {_subject(a, 'sgd')}: {name} keeps no squared-gradient statistics, so it does not "
        "use the EF and the gap measured here does not change its steps"
    )
    update = a.update
    if update is not None and update.why_insufficient is None:
        within = int(np.sum(update.values >= STEP_COSINE))
        numbers["median_update_nat_cosine"] = update.median
        text += (
            f"; they pointed within 60° of the natural gradient "
            f"{share_phrase(within, len(update.values))} (median cosine {update.median:.2f}), "
            "as plain gradient steps do"
        )
    text += (
        ". No change needed; for curvature-aware steps, add a preconditioner built from the "
        "Fisher (labels sampled from the model, as K-FAC does), not from the EF"
    )
    direction = a.direction
    if direction is not None and direction.why_insufficient is None:
        disagree = int(np.sum(direction.values < DISAGREE_COSINE))
        numbers["direction_outcome"] = a.direction_outcome
        text += (
            f" — here the EF step disagreed with the natural gradient "
            f"{share_phrase(disagree, len(direction.values))}"
        )
    return Verdict("headline", "info", [text + "."], numbers, links)


def _kfac(a: Assessment) -> Verdict:
    links = ["docs/guide/acting.md#kfac", "docs/glossary.md#kflr-kfc"]
    subject, m = _subject(a, "kfac"), a.direction
    what = a.optimizer or "your preconditioner"
    if m is None:
        text = (
            f"For {subject}: no structure logged a direction cosine, so the EF's effect on "
            "preconditioned steps is unknown; measure with an exact Fisher "
            "(FisherMonitor(structures=('diag', 'block')))."
        )
        return Verdict("headline", "insufficient", [text], {"use": "kfac"}, links)
    if m.why_insufficient is not None:
        return _insufficient(m, f"for {subject}", "kfac", links)
    outcome, count = a.direction_outcome, len(m.values)
    numbers = {"use": "kfac", "optimizer": a.optimizer, "direction_outcome": outcome}
    numbers["median_direction_cosine"] = m.median
    agree = share_phrase(int(np.sum(m.values >= AGREE_COSINE)), count)
    disagree = share_phrase(int(np.sum(m.values < DISAGREE_COSINE)), count)
    own = (
        f"; {what}'s own steps had median cosine {a.update.median:.2f} with the natural gradient"
        if a.update is not None and a.update.why_insufficient is None
        else ""
    )
    built = f"For {subject}: a preconditioner built from the EF (gradients at the observed labels)"
    where = f"(median cosine {m.median:.2f}, {m.where()}{own})"
    if outcome == "disagree":
        text = (
            f"{built} would point away from the natural gradient {disagree} {where}: if {what} "
            "builds its curvature from observed-label gradients (an empirical Fisher, "
            "Shampoo-style gradient products), build it from labels sampled from the model (the "
            "Monte-Carlo Fisher) instead, or damp it more."
        )
        return Verdict("headline", "bad", [text], numbers, links)
    if outcome == "agree":
        text = (
            f"{built} would agree with the natural gradient {agree} {where}: EF-based curvature "
            "is a fair stand-in here, at this damping; no change needed."
        )
        return Verdict("headline", "good", [text], numbers, links)
    text = (
        f"{built} would agree with the natural gradient {agree} and disagree {disagree} "
        f"{where}: prefer curvature from labels sampled from the model, at least for the layers "
        "the heat map shows red."
    )
    return Verdict("headline", "mixed", [text], numbers, links)


def _laplace(a: Assessment) -> Verdict:
    links = ["docs/guide/acting.md#laplace", "docs/glossary.md#laplace"]
    if a.loss_name.startswith("MSELoss"):
        links.insert(1, "docs/guide/acting.md#gaussian-noise")
    subject = "For a Laplace approximation, TIC or other uncertainty from this model"
    error, ratio = a.error, a.ratio
    if error is None:
        text = f"{subject}: no structure logged rel_error, so the EF's matrix error is unknown."
        return Verdict("headline", "insufficient", [text], {"use": "laplace"}, links)
    if error.why_insufficient is not None:
        return _insufficient(error, "for a Laplace or uncertainty use", "laplace", links)
    matrix, scale = a.matrix_outcome, a.scale_outcome
    numbers = {"use": "laplace", "matrix_outcome": matrix, "scale_outcome": scale}
    numbers["median_rel_error"] = error.median
    kl = f"; KL {a.kl.median:.3g} nats" if a.kl is not None else ""
    differ = (
        f"differs from the Fisher by {100 * error.median:.0f}% as a matrix ({error.where()}{kl})"
    )
    scale_text = ""
    if ratio is not None and scale in ("low", "high", "near"):
        verb = "understates" if ratio.median < 1 else "overstates"
        scale_text = f" and {verb} its scale (tr EF / tr F {ratio.median:.3g})"
    if matrix == "differ" or scale in ("low", "high"):
        text = f"{subject}: the EF {differ}{scale_text}: build it on the Fisher (the GGN)."
        return Verdict("headline", "bad", [text], numbers, links)
    if matrix == "close" and scale == "match":
        text = (
            f"{subject}: the EF {differ} and matches its scale: EF-based variances are close "
            "to the Fisher's here; no change needed (the GGN stays the safer choice where it "
            "is affordable)."
        )
        return Verdict("headline", "good", [text], numbers, links)
    text = (
        f"{subject}: the EF is a rough stand-in — it {differ}{scale_text}: prefer the Fisher "
        "(the GGN) for variances you rely on."
    )
    return Verdict("headline", "mixed", [text], numbers, links)


def _general(a: Assessment) -> Verdict:
    links = ["docs/guide/acting.md#uses", "docs/glossary.md#ef"]
    found = []
    if a.direction is not None and a.direction.why_insufficient is None:
        disagree = int(np.sum(a.direction.values < DISAGREE_COSINE))
        share = share_phrase(disagree, len(a.direction.values))
        found.append(f"the EF step disagreed with the natural gradient {share}")
    if a.error is not None and a.error.why_insufficient is None:
        found.append(f"the EF differs from the Fisher by {100 * a.error.median:.0f}% as a matrix")
    measured = f" ({' and '.join(found)})" if found else ""
    text = (
        f"What this gap means depends on how you use curvature{measured}: SGD and Adam "
        "trainings are not hurt by it directly, EF-based preconditioners (K-FAC, Shampoo) and "
        "EF Laplace approximations are; name your use for advice "
        "(fisher-monitor report --use adam|sgd|kfac|laplace)."
    )
    return Verdict("headline", "info", [text], {"use": None}, links)


_HEADLINES: dict[str, Callable[[Assessment], Verdict]] = {
    "adam": _adam,
    "sgd": _sgd,
    "kfac": _kfac,
    "laplace": _laplace,
}


def headline_verdict(a: Assessment, use: str | None) -> Verdict:
    """The headline of an assessed run for ``use`` (``None``: no use known)."""
    return _HEADLINES.get(use or "", _general)(a)


__all__ = ["ADAPTIVE", "CURVATURE", "USES", "check_use", "headline_verdict", "infer_use"]
