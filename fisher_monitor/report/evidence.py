"""What a run's logs say, before any sentence: the series each verdict uses, and outcomes.

They are computed once per run, so that no two verdicts can read them differently.

Each topic uses what was measured: a metric's series comes from the first structure, in
the order block, kron, diag, that logged it (a sketched block Fisher, for instance, has no
direction cosine; the diagonal's is used then, and the verdict says so). Outcomes:

- *direction*: ``"disagree"`` when the EF-preconditioned step disagrees with the natural
  gradient (cosine < 0.5) in at least half of the measurements, ``"agree"`` when it agrees
  (cosine ≥ 0.9) in at least 90%, ``"mixed"`` otherwise;
- *matrix*: ``"close"`` up to a median relative error of 0.1, ``"rough"`` up to 0.5,
  ``"differ"`` above;
- *scale*: ``"match"`` for a median trace ratio in [0.8, 1.25], ``"near"`` within
  [0.5, 2], ``"low"`` below, ``"high"`` above.

Standard library and NumPy only (the report does not import torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fisher_monitor import keys
from fisher_monitor.report.runs import Run
from fisher_monitor.report.thresholds import (
    AGREE_COSINE,
    AGREE_SHARE,
    DISAGREE_COSINE,
    DISAGREE_SHARE,
    FOLLOWS_MARGIN,
    MIN_MEASUREMENTS,
    REL_ERROR_CLOSE,
    REL_ERROR_LIMIT,
    TRACE_AGREES_RANGE,
    TRACE_RATIO_RANGE,
)

#: Verdict levels, worst first. ``info`` states what the numbers mean where there is
#: nothing to judge (e.g. a gap that does not reach this training).
LEVELS = ("bad", "mixed", "insufficient", "info", "good")


class Code(str):
    """A part of a verdict shown as code (a layer name): escaped, never interpreted."""


@dataclass
class Verdict:
    """One verdict of the report: its sentence(s), the numbers behind them, where to read on.

    Attributes:
        topic: ``"headline"`` or one of :data:`fisher_monitor.report.verdict.TOPICS`.
        level: One of :data:`LEVELS`.
        parts: The sentence as text and :class:`Code` parts (user names are code).
        numbers: The numbers behind the sentence (stable keys).
        links: Documentation sections that explain the terms and what to do
            (``docs/glossary.md#ef``, ``docs/guide/acting.md#adam``).
    """

    topic: str
    level: str
    parts: list[str]
    numbers: dict[str, float | int | str | None] = field(default_factory=dict)
    links: list[str] = field(default_factory=list)

    @property
    def sentence(self) -> str:
        """The verdict without its links, code parts in backticks."""
        return "".join(f"`{part}`" if isinstance(part, Code) else part for part in self.parts)

    @property
    def text(self) -> str:
        """The verdict as plain text: the sentence, then where to read on."""
        if not self.links:
            return self.sentence
        return f"{self.sentence} (See {' and '.join(self.links)}.)"

    def as_dict(self) -> dict:
        """Plain data for JSON."""
        return {
            "topic": self.topic,
            "level": self.level,
            "text": self.text,
            "numbers": dict(self.numbers),
            "links": list(self.links),
        }


# ---------------------------------------------------------------- phrases


def plural(count: int, noun: str) -> str:
    """``"1 measurement"``, ``"3 measurements"``."""
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


def median_phrase(values: np.ndarray, digits: str = ".2f") -> str:
    """``"0.42"`` for one value, else ``"median 0.42"``."""
    return f"{values[0]:{digits}}" if len(values) == 1 else f"median {np.median(values):{digits}}"


def steps_phrase(steps: np.ndarray) -> str:
    """``"at step 40"`` or ``"at steps 0–40"``."""
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
MAKE_FINITE = (
    "find out why the other measurements are not finite: the run's notes name the cause "
    "(a NaN or infinite loss or gradient, an overflow under float16 or bfloat16, a zero "
    "curvature trace); measuring more often will not help while they stay non-finite"
)


def evidence(steps: np.ndarray, logged: int = 0) -> str | None:
    """Why measurements at ``steps`` are not enough evidence (``None`` when they are).

    Args:
        steps: The steps with a finite value.
        logged: How many measurements logged the metric, finite or not (``0``: as many
            as ``steps``).
    """
    if len(steps) == 0:
        return "no measurement"
    if logged > len(steps) and len(steps) < MIN_MEASUREMENTS:
        bad = logged - len(steps)
        return (
            f"only {len(steps)} of {plural(logged, 'measurement')} gave a finite value "
            f"({steps_phrase(steps)}; {bad} {'was' if bad == 1 else 'were'} NaN or infinite, "
            f"and at least {MIN_MEASUREMENTS} finite values are needed)"
        )
    if not np.any(steps > 0):
        where = "at step 0" if len(steps) == 1 else "all at step 0"
        return f"{plural(len(steps), 'measurement')}, {where}, before any training step"
    if len(steps) < MIN_MEASUREMENTS:
        return (
            f"only {plural(len(steps), 'measurement')} ({steps_phrase(steps)}; "
            f"at least {MIN_MEASUREMENTS} are needed)"
        )
    return None


# ---------------------------------------------------------------- measured series


@dataclass(frozen=True)
class Measured:
    """A metric's finite values over a run, from the structure that logged it.

    Attributes:
        metric: The metric.
        structure: The structure the values come from (``"optimizer"`` for the
            preconditioner audit).
        steps: The steps of the finite values.
        values: The finite values.
        instead_of: The run's primary structure when it lacks the metric, else ``None``.
        logged: How many measurements logged the metric, finite or not.
    """

    metric: str
    structure: str
    steps: np.ndarray
    values: np.ndarray
    instead_of: str | None = None
    logged: int = 0

    @property
    def median(self) -> float:
        """The median value."""
        return float(np.median(self.values))

    @property
    def why_insufficient(self) -> str | None:
        """Why these measurements are not evidence (``None`` when they are)."""
        return evidence(self.steps, self.logged)

    @property
    def advice(self) -> str:
        """What to change when :attr:`why_insufficient` is not ``None``."""
        if self.logged > len(self.steps):
            return MAKE_FINITE
        return MEASURE_BRIEFLY

    def where(self) -> str:
        """The structure, and why it is not the primary one: ``"diag; block has no …"``."""
        if self.instead_of is None:
            return self.structure
        name = self.metric.replace("_", " ")
        return f"{self.structure}; {self.instead_of} logged no {name}"


def ordered_structures(run: Run) -> list[str]:
    """The run's structures in the order verdicts prefer them: block, kron, diag."""
    return [s for s in keys.PRIMARY_ORDER if s in run.structures]


def _suffix(run: Run, structure: str) -> str:
    """The damping suffix of the run's first damping in ``structure`` (``""`` with one)."""
    found = []
    for parsed in run.parsed.values():
        if parsed.structure == structure and parsed.metric in keys.DAMPED_METRICS:
            suffix = f"@{parsed.damping}" if parsed.damping else ""
            if suffix not in found:
                found.append(suffix)
    first = run.dampings[0] if run.dampings else ""
    return first if first in found or not found else found[0]


def _finite(run: Run, key: str) -> tuple[np.ndarray, np.ndarray, int]:
    """The finite values of ``key``, their steps and how many values were logged."""
    steps, values = run.series(key)
    keep = np.isfinite(values)
    return steps[keep], values[keep], len(values)


def measured(
    run: Run, metric: str, layer: str = keys.ALL, only: tuple[str, ...] | None = None
) -> Measured | None:
    """A metric's series from the first structure (block, kron, diag) that logged it.

    Args:
        run: The run.
        metric: A structure metric (``keys.METRICS``, ``keys.UPDATE_METRICS``) or an
            optimizer metric (``keys.OPTIMIZER_METRICS``).
        layer: The layer (default the whole network).
        only: Restrict to these structures.

    Returns:
        The series, or ``None`` when no structure logged a finite value.
    """
    if metric in keys.OPTIMIZER_METRICS:
        steps, values, logged = _finite(run, keys.optimizer_key(metric, layer))
        found = Measured(metric, keys.OPTIMIZER, steps, values, logged=logged)
        return found if len(values) else None
    structures = ordered_structures(run)
    for structure in structures if only is None else [s for s in structures if s in only]:
        suffix = _suffix(run, structure) if metric in keys.DAMPED_METRICS else ""
        steps, values, logged = _finite(run, keys.metric_key(structure, metric, layer, suffix))
        if len(values):
            primary = structures[0] if structures else structure
            instead_of = primary if primary != structure else None
            return Measured(metric, structure, steps, values, instead_of, logged)
    return None


def measured_steps(run: Run) -> np.ndarray:
    """Every step with a finite value of any structure metric of the whole network."""
    steps: set[int] = set()
    for key, parsed in run.parsed.items():
        if parsed.layer == keys.ALL and not parsed.stderr:
            steps.update(int(s) for s in _finite(run, key)[0])
    return np.array(sorted(steps), dtype=np.int64)


# ---------------------------------------------------------------- outcomes


def direction_outcome(cosines: np.ndarray) -> str:
    """``"disagree"``, ``"agree"`` or ``"mixed"`` (see the module docstring)."""
    count = len(cosines)
    if np.sum(cosines < DISAGREE_COSINE) / count >= DISAGREE_SHARE:
        return "disagree"
    if np.sum(cosines >= AGREE_COSINE) / count >= AGREE_SHARE:
        return "agree"
    return "mixed"


def matrix_outcome(median_error: float) -> str:
    """``"close"``, ``"rough"`` or ``"differ"`` for a median relative error."""
    if median_error <= REL_ERROR_CLOSE:
        return "close"
    return "rough" if median_error <= REL_ERROR_LIMIT else "differ"


def scale_outcome(median_ratio: float) -> str:
    """``"match"``, ``"near"``, ``"low"`` or ``"high"`` for a median trace ratio."""
    if TRACE_AGREES_RANGE[0] <= median_ratio <= TRACE_AGREES_RANGE[1]:
        return "match"
    if TRACE_RATIO_RANGE[0] <= median_ratio <= TRACE_RATIO_RANGE[1]:
        return "near"
    return "low" if median_ratio < TRACE_RATIO_RANGE[0] else "high"


def follows(with_ef: Measured | None, with_f: Measured | None) -> str | None:
    """Which diagonal an optimizer's preconditioner follows.

    Returns:
        ``"ef"`` or ``"fisher"`` when its median cosine with that one is larger by more
        than :data:`FOLLOWS_MARGIN`, ``"both"`` otherwise, ``None`` when not audited.
    """
    if with_ef is None or with_f is None:
        return None
    if with_ef.median > with_f.median + FOLLOWS_MARGIN:
        return "ef"
    if with_f.median > with_ef.median + FOLLOWS_MARGIN:
        return "fisher"
    return "both"


@dataclass
class Assessment:
    """Everything the verdicts of one run say, computed once.

    Attributes:
        run: The run.
        direction: ``direction_cosine`` of the whole network, and its outcome.
        diag_direction: The same of the diagonal (what Adam-like methods use).
        error: ``rel_error``, and the matrix outcome.
        diag_error: The same of the diagonal.
        kl: ``kl`` (same structure as ``error`` where logged).
        ratio: ``trace_ratio``, and the scale outcome.
        update: ``update_nat_cosine`` (the optimizer audit), with the step's cosines with
            the EF step and −g and the preconditioner's with √diag EF and √diag F.
        follows: What the preconditioner follows (:func:`follows`).
        loss: The probe loss (for the Gaussian noise of ``MSELoss``).
    """

    run: Run
    direction: Measured | None
    diag_direction: Measured | None
    error: Measured | None
    diag_error: Measured | None
    kl: Measured | None
    ratio: Measured | None
    update: Measured | None
    update_ef: Measured | None
    update_grad: Measured | None
    with_ef: Measured | None
    with_f: Measured | None
    loss: np.ndarray

    @property
    def direction_outcome(self) -> str | None:
        """Outcome of :attr:`direction` (``None`` when not measured)."""
        return direction_outcome(self.direction.values) if self.direction else None

    @property
    def diag_outcome(self) -> str | None:
        """Outcome of :attr:`diag_direction`."""
        return direction_outcome(self.diag_direction.values) if self.diag_direction else None

    @property
    def matrix_outcome(self) -> str | None:
        """Outcome of :attr:`error`."""
        return matrix_outcome(self.error.median) if self.error else None

    @property
    def scale_outcome(self) -> str | None:
        """Outcome of :attr:`ratio`."""
        return scale_outcome(self.ratio.median) if self.ratio else None

    @property
    def follows(self) -> str | None:
        """What the optimizer's preconditioner follows."""
        return follows(self.with_ef, self.with_f)

    @property
    def optimizer(self) -> str | None:
        """The optimizer's class name from the settings."""
        name = self.run.settings.get("optimizer")
        return str(name) if name else None

    @property
    def loss_name(self) -> str:
        """The loss as the settings name it (``"MSELoss(reduction='mean')"``), or ``""``."""
        return str(self.run.settings.get("loss") or "")


def assess(run: Run) -> Assessment:
    """Read every series the verdicts use from ``run``."""
    error = measured(run, "rel_error")
    kl = measured(run, "kl", only=(error.structure,)) if error else None
    update = measured(run, "update_nat_cosine")
    same = (update.structure,) if update else None
    loss = _finite(run, keys.probe_key("loss"))[1]
    return Assessment(
        run=run,
        direction=measured(run, "direction_cosine"),
        diag_direction=measured(run, "direction_cosine", only=("diag",)),
        error=error,
        diag_error=measured(run, "rel_error", only=("diag",)),
        kl=kl or measured(run, "kl"),
        ratio=measured(run, "trace_ratio"),
        update=update,
        update_ef=measured(run, "update_ef_cosine", only=same),
        update_grad=measured(run, "update_grad_cosine", only=same),
        with_ef=measured(run, "preconditioner_ef_cosine"),
        with_f=measured(run, "preconditioner_fisher_cosine"),
        loss=loss,
    )


__all__ = [
    "LEVELS",
    "MAKE_FINITE",
    "MEASURE_BRIEFLY",
    "MEASURE_MORE",
    "Assessment",
    "Code",
    "Measured",
    "Verdict",
    "assess",
    "direction_outcome",
    "evidence",
    "follows",
    "matrix_outcome",
    "measured",
    "measured_steps",
    "median_phrase",
    "ordered_structures",
    "plural",
    "range_phrase",
    "scale_outcome",
    "share_phrase",
    "steps_phrase",
]
