"""Reports of many runs: a table of every run, the details for the runs that matter.

A sweep leaves hundreds or thousands of runs; a figure with one panel per run, or a
section per run, is neither readable nor affordable (2000 runs drew 2004 figures for more
than ten minutes at 9 GB). Up to :data:`MANY_RUNS` runs, a report shows every run in
full. Beyond that it shows one row per run (its measurements, its median direction
cosine and the level of each verdict), sorted with the most concerning first, and draws
figures and gives verdict details, settings and per-layer tables for the
:data:`MANY_RUNS` runs that matter most; it says so at the top. ``summary.json`` keeps
every run in full.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fisher_monitor.report.runs import Run
from fisher_monitor.report.verdict import LEVELS, TOPICS, Verdict, verdicts

#: Up to this many runs a report shows every run in full; beyond, the runs that matter.
MANY_RUNS = 8
#: Level labels of the table of runs (a topic without a verdict: "–").
_LABELS = {"bad": "bad", "mixed": "mixed", "good": "good", "insufficient": "insufficient"}


@dataclass
class Selection:
    """Which runs a report shows in full, and the table of every run.

    Attributes:
        runs: Every run, in the order loaded.
        shown: The runs shown in full (figures, verdicts, settings, per-layer tables).
        found: Per run (by position in ``runs``), its verdicts, computed once.
        headings: Headings of the table of runs (empty when every run is shown).
        rows: One row of cells per run, most concerning first (empty likewise).
        note: What the report shows and why (``None`` when every run is shown).
    """

    runs: list[Run]
    shown: list[Run]
    found: list[list[Verdict]]
    headings: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    note: str | None = None

    def __post_init__(self) -> None:
        self._index = {id(run): index for index, run in enumerate(self.runs)}

    def verdicts_of(self, run: Run) -> list[Verdict]:
        """The verdicts of ``run`` (one of :attr:`runs`; another is judged now)."""
        index = self._index.get(id(run))
        return self.found[index] if index is not None else verdicts(run)

    @property
    def capped(self) -> bool:
        """Whether some runs are only in the table of runs."""
        return len(self.shown) < len(self.runs)


def median_direction_cosine(run: Run) -> float:
    """The whole network's median direction cosine over the run (``nan`` when not logged)."""
    values = run.series(run.key("direction_cosine"))[1]
    values = values[np.isfinite(values)]
    return float(np.median(values)) if len(values) else math.nan


def concern(run: Run, found: Sequence[Verdict]) -> tuple[int, float, str]:
    """Sort key, most concerning first: the headline verdict's level, then the median cosine.

    The headline is the preconditioning verdict (else the first); a run without verdicts
    comes last, as does a run without direction cosines among runs of the same level.
    """
    headline = next((v for v in found if v.topic == "preconditioning"), None)
    headline = headline or (found[0] if found else None)
    level = LEVELS.index(headline.level) if headline and headline.level in LEVELS else len(LEVELS)
    median = median_direction_cosine(run)
    return level, median if math.isfinite(median) else math.inf, run.name


def select_runs(runs: Sequence[Run], limit: int = MANY_RUNS) -> Selection:
    """Every run in full when there are at most ``limit``; else the ``limit`` that matter.

    Args:
        runs: The loaded runs.
        limit: How many runs a report shows in full.

    Returns:
        The selection, with every run's verdicts (computed once here).
    """
    runs = list(runs)
    found = [verdicts(run) for run in runs]
    if len(runs) <= limit:
        return Selection(runs, runs, found)
    order = sorted(range(len(runs)), key=lambda i: concern(runs[i], found[i]))
    chosen = set(order[:limit])
    shown = [run for index, run in enumerate(runs) if index in chosen]
    topics = [topic for topic in TOPICS if any(v.topic == topic for f in found for v in f)]
    headings = ["run", "measurements", "median direction cosine", *topics, "shown in full"]
    rows = []
    for index in order:
        run, levels = runs[index], {v.topic: v.level for v in found[index]}
        median = median_direction_cosine(runs[index])
        steps = f" (steps {run.steps[0]}–{run.steps[-1]})" if run.steps else ""
        rows.append(
            [
                run.name,
                f"{len(run.steps)}{steps}",
                f"{median:.2f}" if math.isfinite(median) else "–",
                *(_LABELS.get(levels.get(topic, ""), "–") for topic in topics),
                "yes" if index in chosen else "",
            ]
        )
    note = (
        f"This report covers {len(runs)} runs. Every run is in the table of runs below "
        "(most concerning first) and in full in summary.json; verdicts, settings, "
        f"per-layer tables and figures are shown for the {limit} runs that matter most: "
        "those with the worst headline (preconditioning) verdict and then the lowest median "
        "direction cosine. To see another run in full, report it on its own."
    )
    return Selection(runs, shown, found, headings, rows, note)


__all__ = ["MANY_RUNS", "Selection", "concern", "median_direction_cosine", "select_runs"]
