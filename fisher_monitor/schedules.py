"""When to measure: callables ``step -> bool`` over the trainer's ``global_step``.

Any callable works as ``FisherMonitor(schedule=...)``; the classes here are picklable
(for ``ddp_spawn`` and checkpoints), print readably in the logged settings, and can be
named in a LightningCLI config.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fisher_monitor.settings import is_whole_number

Schedule = Callable[[int], bool]


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


__all__ = ["Schedule", "every", "log_spaced"]
