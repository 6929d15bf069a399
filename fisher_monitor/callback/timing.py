"""The monitor's own time against the fit's wall time (``probe/overhead``, the summary).

Everything the monitor adds to the fit counts: the time it spends in its own calls
(measurements, logging, histograms, the heat map, the optimizer audit, preparation), and
what those calls leave behind: right after a measurement the training step runs slower
(the measurement evicted the network's data from the caches, the allocator's free lists
hold other sizes), and so does the measured step's own forward and backward pass. The
ledger times every training step (from the start of its batch to its end, the monitor's
own calls taken out) and charges the excess of the two steps a measurement disturbs over
a typical undisturbed step (the median of the last :data:`TYPICAL_WINDOW` of them). The
hooks that run at every step charge their own bookkeeping too (:func:`charged`), and so does
Lightning's dispatch of them: each hook call of a callback passes through a profiler context
and an attribute lookup (about 1.5 µs), six times a step, which the hooks cannot time from
inside. The ledger counts the calls and charges them at the cost measured once per fit
(:func:`dispatch_seconds`).
"""

from __future__ import annotations

import functools
import statistics
from collections import deque
from collections.abc import Callable
from typing import Any

#: Undisturbed steps the typical step time is the median of.
TYPICAL_WINDOW = 32
#: Steps a measurement disturbs: its own (after the measurement) and the next one.
DISTURBED_STEPS = 2
#: Undisturbed steps needed before the excess of disturbed ones is charged.
MIN_TYPICAL = 3
#: Hook calls timed per round, and rounds (the median is kept), to measure Lightning's
#: dispatch of one hook call (:func:`dispatch_seconds`).
DISPATCH_CALLS = 32
DISPATCH_ROUNDS = 5


class Ledger:
    """Time spent by the monitor and elapsed in the fit, carried across resumed fits.

    Args:
        clock: Time source in seconds (the schedule's clock, so that a fake clock in tests
            times both).
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.spent = 0.0
        #: Of :attr:`spent`: the excess time of the steps measurements disturbed.
        self.aftermath = 0.0
        self._elapsed_before = 0.0
        self._started: float | None = None
        self._typical: deque[float] = deque(maxlen=TYPICAL_WINDOW)
        self._step_started: float | None = None
        self._step_charged = 0.0  # the monitor's own time within the current step
        self._disturbed = DISTURBED_STEPS  # steps since the last measurement (capped)
        #: Seconds Lightning takes to dispatch one hook call to the monitor (measured once
        #: per fit with :func:`dispatch_seconds`; 0 until then).
        self.dispatch = 0.0
        self._dispatched = 0  # hook calls since the last charge

    def start(self) -> None:
        """The fit starts: elapsed time counts from now on (added to earlier fits' time)."""
        self._elapsed_before = self.elapsed
        self._started = self.clock()
        self._step_started = None

    @property
    def elapsed(self) -> float:
        """The fit's wall time so far (with earlier fits restored from a checkpoint)."""
        if self._started is None:
            return self._elapsed_before
        return self._elapsed_before + self.clock() - self._started

    def charge(self, seconds: float) -> None:
        """Add the monitor's own time."""
        seconds = max(float(seconds), 0.0)
        self.spent += seconds
        if self._step_started is not None:
            self._step_charged += seconds

    def share(self, pending: float = 0.0) -> float:
        """The monitor's share of the fit's wall time, with ``pending`` seconds not charged yet."""
        elapsed = self.elapsed
        return (self.spent + pending) / elapsed if elapsed > 0 else 0.0

    # ---------------------------------------------------------------- dispatch
    def dispatched(self) -> None:
        """Lightning called one of the monitor's hooks (its dispatch is charged later)."""
        self._dispatched += 1

    def take_dispatch(self) -> float:
        """Seconds of the hook calls counted since the last time, to charge (resets)."""
        seconds = self._dispatched * self.dispatch
        self._dispatched = 0
        return seconds

    # ---------------------------------------------------------------- step timing
    def step_started(self) -> None:
        """A training step (its batch) starts."""
        self._step_started = self.clock()
        self._step_charged = 0.0

    def measured(self) -> None:
        """The current step held a measurement: it and the next step are disturbed."""
        self._disturbed = 0

    def step_finished(self) -> float:
        """A training step ends; returns the excess to charge (0 for undisturbed steps).

        The step's own time is its duration minus the monitor's charged time within it.
        An undisturbed step joins the typical ones; a disturbed one's excess over their
        median is returned (and counted in :attr:`aftermath`), for the caller to charge.
        """
        if self._step_started is None:
            return 0.0
        own = self.clock() - self._step_started - self._step_charged
        self._step_started = None
        disturbed = self._disturbed < DISTURBED_STEPS
        self._disturbed = min(self._disturbed + 1, DISTURBED_STEPS)
        if not disturbed:
            self._typical.append(own)
            return 0.0
        if len(self._typical) < MIN_TYPICAL:
            return 0.0
        excess = max(own - statistics.median(self._typical), 0.0)
        self.aftermath += excess
        return excess

    def state_dict(self) -> dict[str, Any]:
        """Spent and elapsed seconds (for checkpoints)."""
        return {"spent": self.spent, "elapsed": self.elapsed, "aftermath": self.aftermath}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's times."""
        self.spent = float(state["spent"])
        self.aftermath = float(state.get("aftermath", 0.0))
        self._elapsed_before = float(state["elapsed"])
        if self._started is not None:  # restored after the fit started: count from now
            self._started = self.clock()


def dispatch_seconds(callback: Any, trainer: Any, clock: Callable[[], float]) -> float:
    """Seconds Lightning takes to call one hook of ``callback``, beyond the hook itself.

    Lightning calls every hook of every callback through a profiler context, after looking
    the hook up by name (``_call_callback_hooks``). The same is timed here on a hook that
    does nothing: :data:`DISPATCH_ROUNDS` rounds of :data:`DISPATCH_CALLS` calls, the median
    round. The profiler context is that of Lightning's default (a pass-through profiler);
    a profiler that records costs more, and the ledger then charges too little.

    Args:
        callback: The monitor.
        trainer: Its trainer (the hook's arguments).
        clock: The ledger's clock.
    """
    from pytorch_lightning.profilers import PassThroughProfiler

    profiler, module = PassThroughProfiler(), getattr(trainer, "lightning_module", None)
    name = "_dispatch_probe"  # looked up by name at every call, as Lightning does
    rounds = []
    for _ in range(DISPATCH_ROUNDS):
        started = clock()
        for _ in range(DISPATCH_CALLS):
            hook = getattr(callback, name)
            if callable(hook):
                with profiler.profile(f"[Callback]{callback.state_key}.{name}"):
                    hook(trainer, module)
        rounds.append((clock() - started) / DISPATCH_CALLS)
    return max(statistics.median(rounds), 0.0)


def charged(hook: Callable[..., None]) -> Callable[..., None]:
    """A hook of the monitor that charges its own time, beyond what it charged itself.

    For the hooks Lightning calls at every training step: their bookkeeping (the schedule,
    the ledger, the loss recording) is small per step but adds up over a long fit. The
    hook's measurements and logging charge themselves (``self._charge``); the rest of its
    time is charged here, as other work than a measurement.
    """

    @functools.wraps(hook)
    def timed(self: Any, *args: Any, **kwargs: Any) -> None:
        ledger = self._ledger
        started, spent = ledger.clock(), ledger.spent
        try:
            hook(self, *args, **kwargs)
        finally:
            rest = ledger.clock() - started - (ledger.spent - spent)
            if rest > 0:
                self._charge(rest, measurement=False)

    return timed
