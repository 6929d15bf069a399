"""The monitor's own time against the fit's wall time (``probe/overhead``, the summary)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Ledger:
    """Time spent by the monitor and elapsed in the fit, carried across resumed fits.

    Args:
        clock: Time source in seconds (the schedule's clock, so that a fake clock in tests
            times both).
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.spent = 0.0
        self._elapsed_before = 0.0
        self._started: float | None = None

    def start(self) -> None:
        """The fit starts: elapsed time counts from now on (added to earlier fits' time)."""
        self._elapsed_before = self.elapsed
        self._started = self.clock()

    @property
    def elapsed(self) -> float:
        """The fit's wall time so far (with earlier fits restored from a checkpoint)."""
        if self._started is None:
            return self._elapsed_before
        return self._elapsed_before + self.clock() - self._started

    def charge(self, seconds: float) -> None:
        """Add the monitor's own time."""
        self.spent += max(float(seconds), 0.0)

    def share(self, pending: float = 0.0) -> float:
        """The monitor's share of the fit's wall time, with ``pending`` seconds not charged yet."""
        elapsed = self.elapsed
        return (self.spent + pending) / elapsed if elapsed > 0 else 0.0

    def state_dict(self) -> dict[str, Any]:
        """Spent and elapsed seconds (for checkpoints)."""
        return {"spent": self.spent, "elapsed": self.elapsed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's times."""
        self.spent = float(state["spent"])
        self._elapsed_before = float(state["elapsed"])
        if self._started is not None:  # restored after the fit started: count from now
            self._started = self.clock()
