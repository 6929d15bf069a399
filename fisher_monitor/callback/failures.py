"""The failure policy: the monitor never stops training.

Whatever goes wrong while the monitor prepares or measures becomes one warning (per
cause) that names the cause and the fix; training goes on. A cause that may go away (a
lazy module before its first forward pass, NaN in one batch, out of memory) is retried at
the next scheduled step; one that cannot (a loss that is not a likelihood, a batch that
cannot be split) turns the monitor off for the rest of the fit. ``raise_on_error=True``
raises instead.

Causes travel as text (``"TypeError: forward() missing …"``) so that, under data
parallelism, rank zero can diagnose and report a failure that happened on another process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


def diagnose(cause: str, stage: str = "measure") -> Diagnosis:
    """The fix and the retry decision for a cause (as written by :func:`describe`).

    Args:
        cause: ``"{ExceptionType}: {message}"``.
        stage: ``"prepare"`` (finding the network and loss, preparing the shadow copy),
            ``"batch"`` (splitting the training batch into inputs and targets) or
            ``"measure"``.

    Returns:
        The diagnosis.
    """
    kind, _, message = cause.partition(": ")
    lowered = message.lower()
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


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _reason(cause: str) -> str:
    """The cause without its numbers: the same failure at another value is not new."""
    return _NUMBER.sub("#", cause)


class FailurePolicy:
    """Warn once per cause, retry transient causes, switch off on permanent ones.

    Args:
        raise_on_error: Raise the error instead (strict mode).

    Attributes:
        off: Why the monitor is off for the rest of the fit (``None`` while it is on).
        warnings: The warnings given, in order (for the end-of-fit summary).
    """

    def __init__(self, raise_on_error: bool) -> None:
        self.raise_on_error = raise_on_error
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
        found = [(rank, diagnose(cause, stage)) for rank, cause in enumerate(causes) if cause]
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
        if step is None:
            what = f"`FisherMonitor` could not prepare its measurements ({where}{diagnosis.cause})."
        else:
            what = (
                f"`FisherMonitor` skipped the measurement at step {step} "
                f"({where}{diagnosis.cause})."
            )
        then = (
            "The monitor is off for the rest of this fit; training continues."
            if off
            else "It tries again at the next scheduled step (later failures for the same "
            "reason are not repeated); training continues."
        )
        message = " ".join(part for part in (what, diagnosis.fix, then) if part)
        self.warnings.append(message)
        rank_zero_warn(message)
