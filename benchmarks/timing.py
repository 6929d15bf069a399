"""Clocks of the harness: warm plain steps next to each timed call, and peak extra memory.

Why warm steps: right after a measurement, the next training step runs 1.5–2× slower
than a warm one (caches and the allocator's free lists hold the measurement's data), so
dividing by it flatters the measurement. Every timed call here is preceded by
``warm_steps`` plain steps; the first of them absorbs the disturbance left by the
previous call and the median of the others is the warm step that call is compared with.

Peak extra memory on the CPU is the rise of the process's resident-set high-water mark
(``VmHWM``): Linux resets it to the current resident size when ``5`` is written to
``/proc/self/clear_refs``, so the peak of any stretch of code is exact, not sampled. On
CUDA it is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that wall time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], object], device: torch.device) -> float:
    """Seconds one call takes, queued device work included."""
    sync(device)
    start = time.perf_counter()
    call()
    sync(device)
    return time.perf_counter() - start


def warm_step(step: Callable[[], object], device: torch.device, count: int = 3) -> float:
    """Run ``count`` plain steps; the median of all but the first (seconds)."""
    times = [timed(step, device) for _ in range(max(count, 2))]
    return statistics.median(times[1:])


def _status_kib(field_name: str) -> int:
    match = re.search(rf"^{field_name}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"no {field_name} in {_STATUS}")
    return int(match.group(1))


class PeakMemory:
    """Peak memory of a stretch of code above the memory in use when it starts.

    Usage: ``probe.start(); work(); extra = probe.extra_megabytes()``.

    Args:
        device: CPU (resident-set high-water mark, Linux) or CUDA (allocated memory).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "cuda max_memory_allocated" if device.type == "cuda" else "VmHWM"
        self.available = device.type == "cuda" or self._can_reset()
        self._start = 0

    @staticmethod
    def _can_reset() -> bool:
        try:
            _CLEAR_REFS.write_text("5")
            _status_kib("VmHWM")
        except OSError:
            return False
        return True

    def start(self) -> None:
        """Forget earlier peaks; measure from now."""
        if not self.available:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _CLEAR_REFS.write_text("5")  # high-water mark := current resident size
            self._start = _status_kib("VmRSS") * 1024

    def extra_megabytes(self) -> float | None:
        """Peak since :meth:`start` minus the memory in use at it (MiB); ``None`` if unknown."""
        if not self.available:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _status_kib("VmHWM") * 1024
        return max(peak - self._start, 0) / 2**20


@dataclass
class Samples:
    """Timed calls of one kind, each with the warm step measured just before it.

    Attributes:
        seconds: Duration of each call.
        steps: The warm plain step (seconds) adjacent to each call.
        stopped: Why repetitions stopped early (``""`` if they did not).
    """

    seconds: list[float] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)
    stopped: str = ""

    def add(self, seconds: float, step: float) -> None:
        """Record one call and its warm step."""
        self.seconds.append(seconds)
        self.steps.append(step)

    def summary(self) -> dict:
        """Medians of the calls, of the warm steps and of the per-call ratios; every sample."""
        if not self.seconds:
            return {"runs": 0, "stopped": self.stopped}
        ratios = [s / w for s, w in zip(self.seconds, self.steps, strict=True) if w > 0]
        return {
            "runs": len(self.seconds),
            "ms": 1e3 * statistics.median(self.seconds),
            "step_ms": 1e3 * statistics.median(self.steps),
            "ratio": statistics.median(ratios) if ratios else None,
            "stopped": self.stopped,
            "all_ms": [round(1e3 * s, 3) for s in self.seconds],
            "all_step_ms": [round(1e3 * s, 3) for s in self.steps],
        }
