"""When to measure: callables ``step -> bool`` over the trainer's ``global_step``.

Any callable works as ``FisherMonitor(schedule=...)``; the classes here are picklable
(for ``ddp_spawn`` and checkpoints), print readably in the logged settings, and can be
named in a LightningCLI config.

:class:`budget`, the default, decides from time rather than from the step alone. It
follows a small protocol the callback knows (see :class:`TimedSchedule`): ``start()``
when fitting starts, ``charge(seconds, measurement=...)`` with the monitor's own time,
``state_dict()``/``load_state_dict()`` for checkpoints, and ``decided_on_rank_zero``
so that under data parallelism rank zero decides and broadcasts the decision.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from fisher_monitor.settings import is_whole_number

Schedule = Callable[[int], bool]


@runtime_checkable
class TimedSchedule(Protocol):
    """A schedule that decides from the monitor's timings (e.g. :class:`budget`).

    Attributes:
        decided_on_rank_zero: Its decisions depend on this process's clock, so under data
            parallelism rank zero decides and the decision is broadcast.
    """

    decided_on_rank_zero: bool

    def __call__(self, step: int) -> bool:
        """Whether to measure at ``step``."""

    def clock(self) -> float:
        """The time source (seconds) the monitor also times itself with."""

    def start(self) -> None:
        """Fitting (re)starts: from now on, elapsed time counts."""

    def charge(self, seconds: float, measurement: bool = True, one_time: bool = False) -> None:
        """Add ``seconds`` of the monitor's own time.

        A measurement, other work, or a cost paid once per fit (preparing the network).
        """

    def state_dict(self) -> dict[str, Any]:
        """The state to save in a checkpoint."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s state."""


class every:  # noqa: N801 - reads as a function: schedules.every(50)
    """Measure every ``n`` steps, starting at ``offset``.

    Args:
        n: Interval in optimizer steps (≥ 1).
        offset: First step to measure at (≥ 0).

    Example:
        >>> s = every(3)
        >>> [step for step in range(10) if s(step)]
        [0, 3, 6, 9]
    """

    def __init__(self, n: int, offset: int = 0):
        if not is_whole_number(n):
            raise ValueError(f"Invalid interval n: {n!r}. Use a positive integer.")
        if not is_whole_number(offset, minimum=0):
            raise ValueError(f"Invalid offset: {offset!r}. Use a non-negative integer.")
        self.n = n
        self.offset = offset

    def __call__(self, step: int) -> bool:
        """Whether to measure at ``step``."""
        return step >= self.offset and (step - self.offset) % self.n == 0

    def __repr__(self) -> str:
        return f"every({self.n}, offset={self.offset})"


class log_spaced:  # noqa: N801
    """Dense early in training, sparse later: about ``per_decade`` steps per power of ten.

    Measures at step 0 and at every step ``s ≥ 1`` where ``⌊per_decade · log10(s)⌋``
    changes, i.e. at ``1, 2, 3, …`` early on and at geometrically growing intervals
    later. With ``max_interval`` the gap never exceeds that many steps.

    Args:
        per_decade: Measurements per factor of ten in the step count (≥ 1).
        max_interval: Upper bound on the gap between measurements, or ``None``.

    Example:
        >>> s = log_spaced(per_decade=4)
        >>> [step for step in range(60) if s(step)]
        [0, 1, 2, 4, 6, 10, 18, 32, 57]
    """

    def __init__(self, per_decade: int = 10, max_interval: int | None = None):
        if not is_whole_number(per_decade):
            raise ValueError(f"Invalid per_decade: {per_decade!r}. Use a positive integer.")
        if max_interval is not None and not is_whole_number(max_interval):
            raise ValueError(f"Invalid max_interval: {max_interval!r}. Use a positive integer.")
        self.per_decade = per_decade
        self.max_interval = max_interval

    def _bucket(self, step: int) -> int:
        # a tiny offset keeps exact powers of ten in their own bucket despite rounding
        return math.floor(self.per_decade * math.log10(step) + 1e-9)

    def _first_of_bucket(self, step: int) -> int:
        """The first step ``≥ 1`` in the same log bucket as ``step`` (a log-spaced hit)."""
        bucket = self._bucket(step)
        first = max(1, math.ceil(10 ** (bucket / self.per_decade)) - 1)
        while first > 1 and self._bucket(first - 1) == bucket:
            first -= 1
        while self._bucket(first) < bucket:
            first += 1
        return first

    def __call__(self, step: int) -> bool:
        """Whether to measure at ``step``."""
        if step < 0:
            return False
        if step <= 1:
            return True
        first = self._first_of_bucket(step)
        if step == first:
            return True
        return self.max_interval is not None and (step - first) % self.max_interval == 0

    def __repr__(self) -> str:
        return f"log_spaced(per_decade={self.per_decade}, max_interval={self.max_interval})"


class budget:  # noqa: N801
    r"""Measure as often as a share of the training time allows: the default schedule.

    The monitor times itself (every measurement with its logging) and the schedule
    compares that time ``M`` with the training time elapsed ``T`` (the fit's wall time
    minus the monitor's). Preparing the network, paid once per fit, is reported in the
    monitor's share of the time but not drawn from the budget. With ``c`` the monitor's
    last measured cost, at step ``s``:

    - the first step is always measured;
    - when the callback knows the fit's length (``trainer.estimated_stepping_batches``,
      :meth:`expect_steps`), ``minimum`` steps spread over it are always measured: steps
      ``round((S − 1)·(k/(minimum − 1))²)`` for ``k = 0 … minimum − 1`` and ``S`` steps,
      dense early and reaching the last step (``S = 300``, ``minimum = 8``: 0, 6, 24, 55,
      98, 153, 220, 299), so that every fit has enough measurements for the verdicts
      (five) even where one measurement costs more than the budget allows;
    - at any step, it measures when the next measurement fits in the budget,
      ``M + c ≤ fraction · T``;
    - at a step of the log-spaced grid (:class:`log_spaced` with ``per_decade``: steps
      ``1, 2, 3, 4, 6, 7, 8, 10, 13, …``) half of it suffices, ``M + c/2 ≤ fraction · T``,
      so that measurements prefer those steps, densest early in training.

    So measurements come as often as the budget allows, and beyond the guaranteed
    ``minimum`` the monitor's time stays within the budget up to half a measurement
    (``M ≤ fraction · T + c/2``): its share tends to ``fraction`` as training goes on. In a
    short fit of a small network the guaranteed measurements can take more than
    ``fraction`` (the end-of-fit summary reports the share); ``minimum=0`` keeps to the
    budget alone. Nothing is assumed about the cost of a measurement; a slow network, a
    large probe or a busy machine simply get fewer measurements beyond the minimum. The
    state (time spent, time elapsed, last cost, the fit's length) is saved in checkpoints,
    so a resumed run continues the same budget; under data parallelism rank zero decides
    and the decision is broadcast.

    Args:
        fraction: Largest share of the training time the monitor may take beyond the
            guaranteed measurements, ``0 < fraction < 1`` (``0.05``: 5%; ``0.01`` for a
            lighter touch, ``0.2`` for richer curves).
        per_decade: Density of the log-spaced grid preferred early on (≥ 1).
        minimum: Measurements guaranteed per fit, spread over its steps (≥ 0; ``0``: the
            budget alone decides). Needs the fit's length, which the callback passes.
        clock: Time source in seconds (``time.perf_counter`` when ``None``); tests pass
            a fake one. The callback times itself with it too.

    Example:
        >>> now = [0.0]
        >>> schedule = budget(0.1, minimum=0, clock=lambda: now[0])
        >>> schedule.start()
        >>> schedule(0)  # the first step
        True
        >>> schedule.charge(1.0)  # that measurement took 1 s
        >>> now[0] = 11.0  # 10 s of training later: 1 + 1 ≤ 10% of 10? no
        >>> schedule(11)
        False
        >>> schedule(10)  # on the log-spaced grid: 1 + 0.5 ≤ 10% of 10? no
        False
        >>> now[0] = 16.0  # 15 s of training: 1 + 0.5 ≤ 1.5
        >>> schedule(13)
        True
        >>> spread = budget(minimum=8)
        >>> spread.expect_steps(300)
        >>> sorted(spread.guaranteed)
        [0, 6, 24, 55, 98, 153, 220, 299]
    """

    decided_on_rank_zero = True

    def __init__(
        self,
        fraction: float = 0.05,
        per_decade: int = 10,
        minimum: int = 8,
        clock: Callable[[], float] | None = None,
    ):
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, numbers.Real)
            or not 0 < fraction < 1
        ):
            raise ValueError(
                f"Invalid fraction: {fraction!r}. Use a share of the training time between 0 "
                "and 1, e.g. 0.05 for 5%."
            )
        if not is_whole_number(per_decade):
            raise ValueError(f"Invalid per_decade: {per_decade!r}. Use a positive integer.")
        if not is_whole_number(minimum, minimum=0):
            raise ValueError(
                f"Invalid minimum: {minimum!r}. Use a whole number of measurements ≥ 0 "
                "(0: the budget alone decides)."
            )
        if clock is not None and not callable(clock):
            raise ValueError(f"Invalid clock: {clock!r}. Pass a callable returning seconds.")
        self.fraction = float(fraction)
        self.per_decade = per_decade
        self._clock = clock
        self._grid = log_spaced(per_decade)
        self._started: float | None = None
        self._elapsed_before = 0.0  # wall time of earlier fits (restored from a checkpoint)
        self.spent = 0.0
        self.setup = 0.0
        self.last_cost: float | None = None
        self.minimum = int(minimum)
        self.total_steps: int | None = None
        self.guaranteed: frozenset[int] = frozenset()
        self._next_guaranteed: int | None = None  # the first guaranteed step not yet reached
        self._restored = False

    def expect_steps(self, total_steps: int | None) -> None:
        """The fit's length in optimizer steps (``None``: unknown), for the guaranteed steps.

        A length restored from a checkpoint stays when the new one is unknown, and the
        guaranteed steps already passed before the checkpoint are not measured again.
        """
        if total_steps is None or not math.isfinite(total_steps) or total_steps < 1:
            if not self._restored:
                self.total_steps, self.guaranteed, self._next_guaranteed = None, frozenset(), None
            return
        self.total_steps = int(total_steps)
        self.guaranteed = spread_steps(self.total_steps, self.minimum)
        if not self._restored:
            self._next_guaranteed = min(self.guaranteed, default=None)

    def clock(self) -> float:
        """Seconds from the time source."""
        return (self._clock or time.perf_counter)()

    def start(self) -> None:
        """Fitting starts (or resumes): elapsed time counts from now, after earlier fits'."""
        self._elapsed_before = self.elapsed
        self._started = self.clock()

    @property
    def elapsed(self) -> float:
        """Wall time of the fit so far (including earlier fits restored from a checkpoint)."""
        if self._started is None:
            return self._elapsed_before
        return self._elapsed_before + self.clock() - self._started

    @property
    def share(self) -> float:
        """The monitor's share of the fit's wall time so far (0 before any time passed)."""
        elapsed = self.elapsed
        return self.spent / elapsed if elapsed > 0 else 0.0

    def charge(self, seconds: float, measurement: bool = True, one_time: bool = False) -> None:
        """Add the monitor's own time.

        Args:
            seconds: Time the monitor took.
            measurement: Whether it was a measurement (attempt): its time then also
                becomes the cost expected of the next one. Preparation is not.
            one_time: A cost paid once per fit, whatever the cadence (preparing the
                network): reported in the monitor's share of the time (:attr:`setup`) but
                not drawn from the budget, which governs how often to measure.
        """
        seconds = max(float(seconds), 0.0)
        if one_time:
            self.setup += seconds
            return
        self.spent += seconds
        if measurement:
            self.last_cost = seconds

    def __call__(self, step: int) -> bool:
        """Whether to measure at ``step``."""
        if self._started is None:
            self.start()
        if self._next_guaranteed is not None and step >= self._next_guaranteed:
            # a step may jump past a guaranteed one (several optimizers stepping manually,
            # a failed attempt): the next step measured stands in for it
            self._next_guaranteed = min((s for s in self.guaranteed if s > step), default=None)
            return True
        if self.last_cost is None:
            return True
        training = self.elapsed - self.spent - self.setup
        allowed = self.fraction * training
        needed = self.last_cost / 2 if self._grid(step) else self.last_cost
        return self.spent + needed <= allowed

    def state_dict(self) -> dict[str, Any]:
        """Time spent and elapsed, and the last cost (for checkpoints)."""
        return {
            "spent": self.spent,
            "setup": self.setup,
            "elapsed": self.elapsed,
            "last_cost": self.last_cost,
            "total_steps": self.total_steps,
            "next_guaranteed": self._next_guaranteed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the budget of a checkpointed fit."""
        self.spent = float(state["spent"])
        self.setup = float(state.get("setup", 0.0))
        self._elapsed_before = float(state["elapsed"])
        if self._started is not None:  # restored after the fit started: count from now
            self._started = self.clock()
        last = state.get("last_cost")
        self.last_cost = None if last is None else float(last)
        if state.get("total_steps") is not None:
            self.total_steps = int(state["total_steps"])
            self.guaranteed = spread_steps(self.total_steps, self.minimum)
            self._next_guaranteed = state.get("next_guaranteed")
            self._restored = True

    def __getstate__(self) -> dict[str, Any]:
        # the clock of this process means nothing in another one (ddp_spawn, pickling)
        state = dict(self.__dict__)
        state["_elapsed_before"] = self.elapsed
        state["_started"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"budget(fraction={self.fraction}, per_decade={self.per_decade}, "
            f"minimum={self.minimum})"
        )


def spread_steps(total_steps: int, count: int) -> frozenset[int]:
    """``count`` steps of ``0 … total_steps − 1``, dense early and reaching the last one.

    Step ``round((total_steps − 1)·(k/(count − 1))²)`` for ``k = 0 … count − 1``, moved on
    by one where rounding would repeat a step: the gaps grow linearly, so the early steps
    are close together and the later half of the fit still gets a third of them. Fewer
    steps than ``count``: every step.
    """
    if count <= 0:
        return frozenset()
    if total_steps <= count:
        return frozenset(range(total_steps))
    if count == 1:
        return frozenset({0})
    last = total_steps - 1
    steps: list[int] = []
    for k in range(count):
        step = round(last * (k / (count - 1)) ** 2)
        if steps:  # strictly increasing, leaving room for the rest: never fewer than count
            step = max(step, steps[-1] + 1)
        steps.append(min(step, last - (count - 1 - k)))
    return frozenset(steps)


__all__ = ["Schedule", "TimedSchedule", "budget", "every", "log_spaced", "spread_steps"]
