"""The failure policy: the monitor never stops training.

Whatever goes wrong while the monitor prepares, measures or writes its logs becomes one
warning (per cause) that names the cause and the fix; training goes on. A cause that may
go away (a lazy module before its first forward pass, NaN in one batch, out of memory) is
retried at the next scheduled step; one that cannot (a loss that is not a likelihood, a
batch that cannot be split, a fixed probe set the network refuses, one sample above the
memory budget) turns the monitor off for the rest of the fit. A logger that fails to
write is dropped; the others keep receiving every measurement. ``raise_on_error=True``
raises instead.

Causes travel as text (``"TypeError: forward() missing …"``) so that, under data
parallelism, rank zero can diagnose and report a failure that happened on another process.
"""

from __future__ import annotations

import errno
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pytorch_lightning.utilities.rank_zero import rank_zero_warn

#: A tuple of inputs is passed to ``forward`` as positional arguments.
_SPLIT_EXAMPLE = "batch_to_inputs_targets=lambda batch: ((batch[0], batch[1]), batch[2])"


class PeerFailed(RuntimeError):
    """Another process failed its part of a collective measurement (its cause is reported)."""

    def __init__(self) -> None:
        super().__init__("another process failed its part of this measurement")


@dataclass(frozen=True)
class Diagnosis:
    """What went wrong, what to do about it, and whether trying again may help.

    Attributes:
        cause: ``"{ExceptionType}: {message}"``.
        fix: One or two sentences for the user (may be empty when the cause says it).
        transient: Whether the cause may go away, so that the next scheduled step retries.
    """

    cause: str
    fix: str
    transient: bool


def describe(error: BaseException | None) -> str | None:
    """``"{ExceptionType}: {message}"``, or ``None`` for no error or a :class:`PeerFailed`."""
    if error is None or isinstance(error, PeerFailed):
        return None
    return f"{type(error).__name__}: {error}"


def diagnose(cause: str, stage: str = "measure", fixed_probe: bool = False) -> Diagnosis:
    """The fix and the retry decision for a cause (as written by :func:`describe`).

    Args:
        cause: ``"{ExceptionType}: {message}"``.
        stage: ``"prepare"`` (finding the network and loss, preparing the shadow copy),
            ``"batch"`` (splitting the training batch into inputs and targets) or
            ``"measure"``.
        fixed_probe: Whether the probe batch is a fixed set (``probe_data``): the same
            inputs and targets at every step, so that a cause found in them stays.

    Returns:
        The diagnosis.
    """
    kind, _, message = cause.partition(": ")
    lowered = message.lower()
    if kind == "MemoryError" and "even one probe sample" in lowered:
        return Diagnosis(
            cause,
            "No probe size can fit, so no later step can be measured with these settings.",
            transient=False,
        )
    if fixed_probe and stage in ("batch", "measure") and _in_the_data(kind, lowered):
        return Diagnosis(
            cause,
            "The fixed probe set (`probe_data`) is the same at every step, so this cannot "
            "pass later: pass `probe_data` whose inputs the network accepts and whose "
            "targets the loss accepts (as many targets as inputs, class labels within the "
            "number of classes), or leave it out to measure on the training batch.",
            transient=False,
        )
    if kind == "TypeError" and "missing" in lowered and "required" in lowered:
        return Diagnosis(
            cause,
            "The network's forward() takes more than the inputs the monitor found in the "
            "batch: tell it how to split the batch, e.g. for (x, mask, y) batches pass "
            f"`{_SPLIT_EXAMPLE}` (a tuple of inputs is passed as positional arguments).",
            transient=False,
        )
    if "lazy" in lowered:
        return Diagnosis(
            cause,
            "Nothing to do: the monitor measures once a forward pass has given the lazy "
            "modules their shapes.",
            transient=True,
        )
    if kind in ("OutOfMemoryError", "MemoryError") or "out of memory" in lowered:
        return Diagnosis(
            cause,
            "Lower `probe_size`, set `memory_budget`, or measure fewer structures "
            "(e.g. structures=('diag',)).",
            transient=True,
        )
    if kind == "FloatingPointError":
        return Diagnosis(
            cause,
            "The probe batch or the network gave NaN or infinite values at this step; if "
            "every measurement fails, check the data and the learning rate.",
            transient=True,
        )
    if kind in ("NotImplementedError", "UnsupportedNetworkError"):
        return Diagnosis(
            cause,
            "Use backend='auto' (it falls back to torch.func), or pass `network=` to measure "
            "a sub-network the backend supports.",
            transient=False,
        )
    if kind == "UnsupportedLossError" or stage in ("prepare", "batch"):
        # discovery and batch messages carry their own fix ("Pass `loss_fn=...`")
        return Diagnosis(cause, "", transient=stage == "prepare" and kind not in _PERMANENT)
    return Diagnosis(cause, "", transient=True)


#: Preparation failures that a later attempt cannot fix (a missing loss, a bad argument).
_PERMANENT = ("ValueError", "TypeError", "AttributeError", "UnsupportedLossError")
#: Failures caused by what a batch holds (shapes, types, label values), not by the weights.
_DATA_ERRORS = ("ValueError", "TypeError", "IndexError", "RuntimeError")


def _in_the_data(kind: str, lowered_message: str) -> bool:
    """Whether a failure comes from the probe's contents (not NaN, memory or the weights)."""
    return kind in _DATA_ERRORS and "out of memory" not in lowered_message


#: Per ``errno``, what a log-write failure means and what to do.
_WRITE_FIXES = {
    errno.ENOSPC: "The disk is full: free space, or log to another disk.",
    errno.EDQUOT: "The disk quota is used up: free space, or log to another disk.",
    errno.EROFS: "The file system is read-only: log to a writable directory.",
    errno.EACCES: "The log directory is not writable: log to a writable directory.",
    errno.EPERM: "The log directory is not writable: log to a writable directory.",
    errno.ENOENT: "The log directory was deleted or moved during the fit.",
}


def _write_error(error: BaseException) -> BaseException:
    """The first ``OSError`` in the chain of ``error`` (a logger may wrap it), else ``error``."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return error


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _reason(cause: str) -> str:
    """The cause without its numbers: the same failure at another value is not new."""
    return _NUMBER.sub("#", cause)


def never_raises(hook: Callable[..., None]) -> Callable[..., None]:
    """A Lightning hook of the monitor (``self._policy`` its policy): errors become warnings.

    The hooks handle the failures they expect (preparing, measuring, writing); this is
    the last line, so that nothing the monitor does can stop ``Trainer.fit``. Strict mode
    (``raise_on_error=True``) raises.
    """

    @functools.wraps(hook)
    def guarded(self: Any, trainer: Any, *args: Any, **kwargs: Any) -> None:
        try:
            hook(self, trainer, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 - the policy decides (strict mode raises)
            step = getattr(trainer, "global_step", None)
            self._policy.handle([describe(error)], step, hook.__name__, error)

    return guarded


class FailurePolicy:
    """Warn once per cause, retry transient causes, switch off on permanent ones.

    Args:
        raise_on_error: Raise the error instead (strict mode).

    Attributes:
        off: Why the monitor is off for the rest of the fit (``None`` while it is on).
        warnings: The warnings given, in order (for the end-of-fit summary).
    """

    def __init__(self, raise_on_error: bool, fixed_probe: bool = False) -> None:
        self.raise_on_error = raise_on_error
        self.fixed_probe = fixed_probe
        self.off: str | None = None
        self.warnings: list[str] = []
        self._seen: set[tuple[str, bool]] = set()

    def handle(
        self,
        causes: list[str | None],
        step: int | None,
        stage: str,
        error: BaseException | None = None,
    ) -> None:
        """React to a failed attempt.

        Args:
            causes: Per process, its cause (``None``: it did not fail itself). Identical on
                every process, so that every process takes the same decision.
            step: The step of the measurement (``None`` for the start of fitting).
            stage: As for :func:`diagnose`.
            error: This process's own exception (raised again in strict mode).

        Raises:
            Exception: In strict mode, ``error`` (or a :class:`RuntimeError` naming the
                other process's cause).
        """
        found = [
            (rank, diagnose(cause, stage, self.fixed_probe))
            for rank, cause in enumerate(causes)
            if cause
        ]
        if self.raise_on_error:
            if error is not None and not isinstance(error, PeerFailed):
                raise error
            remote = "; ".join(f"process {rank}: {d.cause}" for rank, d in found)
            raise RuntimeError(f"`FisherMonitor` failed on another process ({remote}).")
        if not found:
            return
        permanent = next((d for _, d in found if not d.transient), None)
        if permanent is not None:
            self.off = permanent.cause
        for rank, diagnosis in found:
            self._warn(rank, diagnosis, step, stage, len(causes) > 1, permanent is not None)

    def write_failed(
        self, destination: str, error: BaseException, remaining: int, switch_off: bool
    ) -> None:
        """A logger failed to write and was dropped: one warning, and maybe switch off.

        Args:
            destination: The logger in words (its class and directory).
            error: What its write raised.
            remaining: Loggers still written to.
            switch_off: Whether the monitor switches off (no logger left, one process).

        Raises:
            Exception: In strict mode, ``error``.
        """
        if self.raise_on_error:
            raise error
        cause = describe(_write_error(error)) or describe(error) or "an error"
        fix = _WRITE_FIXES.get(getattr(_write_error(error), "errno", None), "")
        if remaining:
            then = (
                f"The monitor stops writing there and goes on with the other "
                f"{'logger' if remaining == 1 else f'{remaining} loggers'}; training continues."
            )
        elif switch_off:
            self.off = f"no logger left to write to ({cause})"
            then = "No logger is left to write to: the monitor is off for the rest of this fit; "
            then += "training continues."
        else:
            then = (
                "No logger is left to write to: the monitor keeps measuring (the other "
                "processes measure with it) for the end-of-fit summary; training continues."
            )
        message = " ".join(
            part
            for part in (f"`FisherMonitor` could not write to {destination} ({cause}).", fix, then)
            if part
        )
        self.warnings.append(message)
        rank_zero_warn(_printable(message))

    def _warn(
        self,
        rank: int,
        diagnosis: Diagnosis,
        step: int | None,
        stage: str,
        several: bool,
        off: bool,
    ) -> None:
        reason = (_reason(diagnosis.cause), off)  # "off for the rest of the fit" is news
        if reason in self._seen:
            return
        self._seen.add(reason)
        where = f"on process {rank}: " if several else ""
        if stage.startswith("on_") or stage == "teardown":  # a Lightning hook (the last line)
            what = f"`FisherMonitor` failed in `{stage}` ({where}{diagnosis.cause})."
        elif step is None:
            what = f"`FisherMonitor` could not prepare its measurements ({where}{diagnosis.cause})."
        else:
            what = (
                f"`FisherMonitor` skipped the measurement at step {step} "
                f"({where}{diagnosis.cause})."
            )
        then = (
            "The monitor is off for the rest of this fit; training continues."
            if off
            else "Training continues (later failures for the same reason are not repeated)."
            if stage.startswith("on_") or stage == "teardown"
            else "It tries again at the next scheduled step (later failures for the same "
            "reason are not repeated); training continues."
        )
        message = " ".join(part for part in (what, diagnosis.fix, then) if part)
        self.warnings.append(message)
        rank_zero_warn(_printable(message))


def _printable(message: str) -> str:
    """A warning as it may reach a terminal: causes quote user text (names, paths).

    Control characters are shown as escapes (line breaks of a long cause are kept).
    """
    from fisher_monitor.report.text import terminal_safe

    return "\n".join(terminal_safe(line) for line in message.split("\n"))
