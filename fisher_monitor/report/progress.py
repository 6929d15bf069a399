"""Progress of a report: a ``rich`` bar with counts on a terminal, one line per stage otherwise.

A report goes through stages (finding runs, reading events, verdicts, figures, writing);
each stage knows its total (bytes of event files, number of figures, ...). Warnings
(bytes skipped in a damaged file, a run that could not be read) are printed as one line
each without breaking the bar.
"""

from __future__ import annotations

import sys
from typing import TextIO

from fisher_monitor.report.text import terminal_safe


class Progress:
    """Silent progress: the interface, and what the library uses by default."""

    def stage(self, description: str, total: float | None = None, unit: str = "") -> None:
        """Start a stage.

        Args:
            description: What is being done, e.g. ``"reading events"``.
            total: How much there is to do (``None``: unknown).
            unit: ``"bytes"`` to show sizes, else counts are shown as they are.
        """

    def advance(self, amount: float = 1) -> None:
        """Record ``amount`` of the current stage as done."""

    def warn(self, message: str) -> None:
        """Show a warning line."""

    def close(self) -> None:
        """End the last stage."""

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _size(count: float) -> str:
    return f"{count / 2**20:,.0f} MB" if count >= 2**20 else f"{count / 2**10:,.0f} kB"


class LineProgress(Progress):
    """One plain line per stage (and per warning) on a stream: logs, pipes, CI."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stderr

    def stage(self, description: str, total: float | None = None, unit: str = "") -> None:
        """Print ``fisher-monitor: {description} ({total})``."""
        amount = ""
        if total is not None:
            amount = f" ({_size(total)})" if unit == "bytes" else f" ({total:g} {unit})".rstrip()
            amount = amount.replace(" )", ")")
        print(f"fisher-monitor: {terminal_safe(description)}{amount}", file=self.stream)

    def warn(self, message: str) -> None:
        """Print ``fisher-monitor: warning: {message}``."""
        print(f"fisher-monitor: warning: {terminal_safe(message)}", file=self.stream)


class RichProgress(Progress):
    """A live ``rich`` progress bar with counts (sizes for bytes) and elapsed time."""

    def __init__(self, console):
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichBar

        self.console = console
        self._bar = RichBar(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[amount]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._task = None
        self._unit = ""
        self._bar.start()

    def _amount(self, task) -> str:
        if task.total is None:
            return ""
        if self._unit == "bytes":
            return f"{_size(task.completed)} / {_size(task.total)}"
        return f"{task.completed:g}/{task.total:g} {self._unit}".rstrip()

    def stage(self, description: str, total: float | None = None, unit: str = "") -> None:
        """Finish the current bar and start one for this stage."""
        if self._task is not None:
            task = self._bar.tasks[-1]
            if task.total is not None:
                self._bar.update(self._task, completed=task.total)
            self._bar.update(self._task, amount=self._amount(self._bar.tasks[-1]))
        self._unit = unit
        self._task = self._bar.add_task(terminal_safe(description), total=total, amount="")
        self._bar.update(self._task, amount=self._amount(self._bar.tasks[-1]))

    def advance(self, amount: float = 1) -> None:
        """Move the bar."""
        if self._task is not None:
            self._bar.advance(self._task, amount)
            self._bar.update(self._task, amount=self._amount(self._bar.tasks[-1]))

    def warn(self, message: str) -> None:
        """Print the warning above the bar."""
        self._bar.console.print(
            f"fisher-monitor: warning: {terminal_safe(message)}", markup=False, highlight=False
        )

    def close(self) -> None:
        """Complete the last stage and stop the live display."""
        if self._task is not None:
            task = self._bar.tasks[-1]
            if task.total is not None:
                self._bar.update(self._task, completed=task.total)
            self._bar.update(self._task, amount=self._amount(task))
            self._task = None
        self._bar.stop()


def for_console(console) -> Progress:
    """A rich bar when ``console`` is a terminal, else plain lines on its stream."""
    if console.is_terminal:
        return RichProgress(console)
    return LineProgress(console.file)


__all__ = ["LineProgress", "Progress", "RichProgress", "for_console"]
