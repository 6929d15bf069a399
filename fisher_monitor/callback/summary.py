"""What the monitor tells the user: one line when fitting starts, a table when it ends.

Both go out on rank zero only, through Lightning's rank-zero logging; the table is drawn
with ``rich`` when the output is a terminal. The end-of-fit numbers also go into the run
file (``"fit"``), where the report reads them.

Paths, versions, layer names and causes come from outside: every cell is printed as
literal text (never as ``rich`` markup, so ``sweep[lr=0.1]`` stays whole) with control
characters shown as escapes, and the suggested report command quotes its path for the
shell.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_only

from fisher_monitor import keys
from fisher_monitor.callback.history import History
from fisher_monitor.report.text import terminal_safe
from fisher_monitor.shell import report_command

#: Headline metrics of the last measurement, in the order shown.
HEADLINE = ("direction_cosine", "rel_error", "trace_ratio", "kl")
#: Headline metrics of the optimizer audit.
AUDIT_HEADLINE = ("update_nat_cosine", "update_ef_cosine", "update_grad_cosine")
#: The label of the headline verdict's row, the first of the table.
BOTTOM_LINE = "bottom line"
#: Where the summary's terms are explained.
GLOSSARY = "docs/glossary.md (EF, F, F̃ = F + λI and ẼF = EF + λI, damping, TIC, …)"


def start_line(settings: dict[str, Any], layers: int | None, prefix: str) -> str:
    """The line printed when fitting starts.

    Args:
        settings: The run's settings (structures, fisher, damping, backend, schedule,
            network, loss, …); ``network`` is ``None`` when preparing failed.
        layers: Number of layers with parameters (``None`` when not known yet).
        prefix: The logging prefix.

    Returns:
        The line.
    """
    if settings.get("network") is None:
        return (
            "FisherMonitor: not measuring yet (see the warning above); schedule "
            f"{settings['schedule']}."
        )
    structures = " + ".join(settings["structures"])
    fisher = (
        "exact Fisher"
        if settings["fisher"] == "exact"
        else f"Monte-Carlo Fisher ({settings['mc_samples']} label(s) per input)"
    )
    damping = settings["damping"]
    dampings = ", ".join(f"{d:g}" for d in damping) if isinstance(damping, list) else f"{damping:g}"
    counted = f", {layers} layers" if layers is not None else ""
    probe = "a fixed probe set" if settings.get("fixed_probe") else "the training batch"
    if settings.get("probe_size"):
        probe += f" (at most {settings['probe_size']} samples)"
    backend = settings.get("backend_used") or settings["backend"]
    return (
        f"FisherMonitor: comparing F and EF ({structures}; {fisher}, {dampings} "
        f"{settings['damping_mode']} damping) of {settings['network']}{counted} with "
        f"{settings['loss']}, backend {backend}, on {probe}, schedule {settings['schedule']}; "
        f"logged under '{prefix}/'."
    )


def _steps_text(steps: Sequence[int]) -> str:
    if len(steps) <= 8:
        return ", ".join(map(str, steps))
    return ", ".join(map(str, steps[:5])) + ", …, " + ", ".join(map(str, steps[-2:]))


@dataclass
class FitSummary:
    """The end-of-fit summary.

    Attributes:
        history: The measurements.
        monitor_seconds: The monitor's own time (preparation, measurements, logging).
        fit_seconds: Wall time of the fit.
        prefix: The logging prefix.
        log_dirs: TensorBoard run directories (for the report command).
        notes: Notes of the measurements (e.g. sub-sampling), each once.
        warnings: The warnings the monitor gave.
        off: Why the monitor switched itself off, if it did.
        optimizer: The audited optimizer's class name, if any.
        verdicts: The report's verdicts on the measurements.
    """

    history: History
    monitor_seconds: float
    fit_seconds: float
    prefix: str
    log_dirs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    off: str | None = None
    optimizer: str | None = None
    verdicts: list[Any] = field(default_factory=list)

    @property
    def overhead(self) -> float:
        """The monitor's share of the fit's wall time."""
        return self.monitor_seconds / self.fit_seconds if self.fit_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The run file's ``"fit"`` block."""
        return {
            "measurements": len(self.history),
            "steps": self.history.steps,
            "monitor_seconds": self.monitor_seconds,
            "fit_seconds": self.fit_seconds,
            "overhead": self.overhead,
            "off": self.off,
            "warnings": list(self.warnings),
            "verdicts": [getattr(v, "text", str(v)) for v in self.verdicts],
        }

    def _headline(self) -> list[tuple[str, str]]:
        last = self.history.last()
        if last is None:
            return []
        step, values = last
        suffix = self.history.suffix
        order = [self.history.structure, *keys.PRIMARY_ORDER]

        def value(structure_or_group: str, metric: str) -> float | None:
            damped = suffix if metric in keys.DAMPED_METRICS else ""
            key = keys.metric_key(structure_or_group, metric, keys.ALL, damped)
            return values.get(key)

        def first(metric: str) -> tuple[str, float] | None:
            """The metric from the first structure that has it (a sketch has no KL)."""
            return next(
                ((s, v) for s in dict.fromkeys(order) if (v := value(s, metric)) is not None),
                None,
            )

        found = [(m, hit) for m in HEADLINE if (hit := first(m)) is not None]
        groups: dict[str, list[str]] = {}
        for metric, (structure, number) in found:
            groups.setdefault(structure, []).append(f"{metric} {number:.3g}")
        text = "; ".join(f"{s}, whole network: {', '.join(parts)}" for s, parts in groups.items())
        rows = [(f"last measurement (step {step})", text)]
        audit = [(m, hit[1]) for m in AUDIT_HEADLINE if (hit := first(m)) is not None]
        audit += [(m, value(keys.OPTIMIZER, m)) for m in keys.OPTIMIZER_METRICS]
        if any(v is not None for _, v in audit):
            name = self.optimizer or "optimizer"
            text = ", ".join(f"{m} {v:.3g}" for m, v in audit if v is not None)
            rows.append((f"{name}'s step (last)", text))
        return rows

    def _bottom_line(self) -> list[tuple[str, str]]:
        """The headline verdict (what the numbers mean for this training), if any."""
        return [
            (BOTTOM_LINE, getattr(v, "text", str(v)))
            for v in self.verdicts
            if getattr(v, "topic", "") == "headline"
        ]

    def _verdict_rows(self) -> list[tuple[str, str]]:
        """Each verdict's first sentence, the advice of the most pressing one, the glossary."""
        rows = []
        found = [v for v in self.verdicts if getattr(v, "topic", "") != "headline"]
        for verdict in found:
            sentences = _sentences(_sentence(verdict))
            rows.append((f"verdict: {getattr(verdict, 'topic', '')}".rstrip(": "), sentences[0]))
        pressing = [v for v in found if getattr(v, "level", "good") in ("bad", "mixed")]
        pressing = pressing or [v for v in found if getattr(v, "level", "good") != "good"]
        if pressing:
            advice = _sentences(_sentence(pressing[0]))
            if len(advice) > 1:
                rows.append(("what to do", advice[-1]))
        if self.verdicts:
            rows.append(("terms", GLOSSARY))
        return rows

    def rows(self) -> list[tuple[str, str]]:
        """``(label, text)`` rows of the table."""
        count = len(self.history)
        rows = [
            *self._bottom_line(),
            (
                "measurements",
                f"{count}" + (f" at steps {_steps_text(self.history.steps)}" if count else ""),
            ),
            (
                "monitor's share of the fit",
                f"{100 * self.overhead:.1f}% ({self.monitor_seconds:.2f} s of "
                f"{self.fit_seconds:.2f} s)",
            ),
            *self._headline(),
        ]
        rows += self._verdict_rows()
        rows += [("note", note) for note in self.notes]
        if self.off:
            rows.append(("monitor off", self.off))
        elif self.warnings:
            rows.append(("warnings", f"{len(self.warnings)} (see above)"))
        for directory in self.log_dirs:
            rows.append(("TensorBoard run", directory))
            rows.append(("report", report_command(Path(directory))))
        if not self.log_dirs:
            rows.append(
                (
                    "report",
                    "fisher-monitor report reads TensorBoard, CSVLogger and MLflow logs: pass "
                    "it the run's log directory (docs/guide/report.md#inputs)",
                )
            )
        return rows

    def printable_rows(self) -> list[tuple[str, str]]:
        """:meth:`rows` with control characters shown as escapes (safe on a terminal)."""
        return [(terminal_safe(label), terminal_safe(text)) for label, text in self.rows()]

    def text(self) -> str:
        """The table as plain text (control characters shown as escapes)."""
        rows = self.printable_rows()
        width = max(len(label) for label, _ in rows)
        lines = ["FisherMonitor summary"]
        lines += [f"  {label:<{width}}  {text}" for label, text in rows]
        return "\n".join(lines)


def verdicts_of(
    history: History, prefix: str, directory: str | None, settings: dict[str, Any]
) -> list[Any]:
    """The report's verdicts on the fit (never an error: the summary goes without them)."""
    try:
        return history.verdicts(prefix, directory, settings)
    except Exception as error:  # noqa: BLE001 - a summary must not fail the fit
        rank_zero_info(
            terminal_safe(
                f"FisherMonitor: no verdicts in the summary ({type(error).__name__}: {error})."
            )
        )
        return []


def _sentence(verdict: Any) -> str:
    """A verdict's sentences without its documentation links."""
    return str(getattr(verdict, "sentence", getattr(verdict, "text", verdict)))


def _sentences(text: str) -> list[str]:
    """Split a verdict into sentences (at a full stop followed by a capital letter)."""
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z`])", text.strip())
    return [part for part in parts if part] or [text]


@rank_zero_only
def show(summary: FitSummary) -> None:
    """Print the summary on rank zero: a ``rich`` table on a terminal, plain text otherwise."""
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(title="FisherMonitor summary", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for label, text in summary.printable_rows():
            table.add_row(Text(label), Text(text))  # literal text, never markup
        Console().print(table)
    else:
        rank_zero_info(summary.text())
