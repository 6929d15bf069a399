"""Where a measurement's results go, and the time they cost.

The history, the progress bar, the writers and the run information receive each
measurement and the optimizer audit's results.

:class:`ResultSink` is the half of :class:`~fisher_monitor.callback.monitor.FisherMonitor`
that handles a finished measurement; the monitor decides when to measure and measures.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from fisher_monitor import distributed, keys
from fisher_monitor.callback.failures import FailurePolicy
from fisher_monitor.callback.history import History
from fisher_monitor.callback.progress_bar import progress_bar_name
from fisher_monitor.callback.tensorboard import ef_over_f_log_ratios
from fisher_monitor.callback.timing import Ledger
from fisher_monitor.callback.update import UpdateRecorder, audited_optimizer
from fisher_monitor.callback.writers import (
    RunInfo,
    Writer,
    WriterGroup,
    encodable_keys,
    time_series,
)
from fisher_monitor.measurement import Measurement
from fisher_monitor.schedules import Schedule, TimedSchedule
from fisher_monitor.settings import DampingMode, MeasureSettings

#: The heat-map image is drawn at every this many measurements (the 10th, 20th, …) and at
#: the end of fitting: a map of one or two columns says nothing, and drawing it is not free.
IMAGE_EVERY = 10


class ResultSink:
    """A measurement's results: logged, kept, charged (mixed into ``FisherMonitor``)."""

    settings: MeasureSettings
    schedule: Schedule
    prog_bar: tuple[str, ...]
    log_histograms: bool
    audit_optimizer: bool
    optimizer_index: int
    _ledger: Ledger
    _history: History
    _policy: FailurePolicy
    _recorder: UpdateRecorder
    _writers: WriterGroup
    _info: RunInfo | None
    _measured: torch.nn.Module | None

    def _record(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        measurement: Measurement,
        step: int,
        started: float,
    ) -> None:
        measured = encodable_keys(measurement.scalars)  # layer names go into files and tags
        scalars = time_series(measured, self._constants)
        scalars[keys.probe_key("overhead")] = self._ledger.share(self._ledger.clock() - started)
        self._history.add(step, measured)
        for key in self.prog_bar:
            if key in scalars:
                pl_module.log(
                    progress_bar_name(key),
                    scalars[key],
                    prog_bar=True,
                    logger=False,
                    on_step=True,
                    on_epoch=False,
                )
        if self._info is not None and (
            self._info.add_coverage(measurement.coverage) | self._info.add_notes(measurement.notes)
        ):
            self._write_info()
        if self._writers:
            ratios = ef_over_f_log_ratios(measurement.diagonals) if self.log_histograms else {}
            self._writers.call("log_scalars", scalars, step)
            self._writers.call("log_histograms", "log10_ef_over_f", encodable_keys(ratios), step)
            if len(self._history) % IMAGE_EVERY == 0:
                self._writers.call("log_heatmap", self._history, step)
        optimizer = self._optimizer(trainer)
        if (
            optimizer is not None
            and trainer.is_global_zero
            and self._measured is not None
            and measurement.directions  # a measurer without them (a user's subclass): no audit
        ):
            self._recorder.arm(optimizer, self._measured, measurement, step)

    @property
    def _constants(self) -> tuple[str, ...]:
        """Metrics that are settings, not time series (λ too when it is absolute)."""
        absolute = self.settings.damping_mode is DampingMode.ABSOLUTE
        return (*keys.CONSTANT_METRICS, *(("damping",) if absolute else ()))

    def _optimizer(self, trainer: pl.Trainer | None) -> torch.optim.Optimizer | None:
        """The audited optimizer (``None``: no audit)."""
        optimizers = trainer.optimizers if trainer is not None else []
        return audited_optimizer(optimizers, self.optimizer_index, self.audit_optimizer)

    def _audited(
        self,
        step: int,
        scalars: dict[str, float],
        histograms: dict[str, dict[str, Any]],
        notes: list[str],
        seconds: float,
    ) -> None:
        """The optimizer audit of the measurement at ``step``.

        Called inside the optimizer's ``step()``: nothing may escape, the policy decides.
        """
        try:
            self._charge(seconds, measurement=False)
            scalars = encodable_keys(scalars)
            self._history.extend(step, scalars)
            if self._info is not None and self._info.add_notes(notes):
                self._write_info()
            self._writers.call("log_scalars", time_series(scalars, self._constants), step)
            for group, values in histograms.items():
                self._writers.call("log_histograms", group, encodable_keys(values), step)
        except Exception as error:  # noqa: BLE001 - strict mode raises
            self._audit_failed(step, error)

    def _audit_failed(self, step: int, error: BaseException) -> None:
        self._policy.handle([f"{type(error).__name__}: {error}"], step, "measure", error)

    def _write_info(self) -> None:
        if self._info is not None:
            self._writers.call("write_info", self._info)

    def _write_failed(self, writer: Writer, error: BaseException, remaining: int) -> None:
        """A logger failed to write: one warning; with none left, a single process stops.

        Under data parallelism every process measures together, and only rank zero
        writes: it keeps measuring (for the end-of-fit summary) rather than leave the
        others waiting for it.
        """
        switch_off = not remaining and not distributed.is_distributed()
        self._policy.write_failed(writer.destination, error, remaining, switch_off)

    def _charge(self, seconds: float, measurement: bool, one_time: bool = False) -> None:
        self._ledger.charge(seconds)
        timed = self._timed()
        if timed is not None:
            timed.charge(seconds, measurement=measurement, one_time=one_time)

    def _timed(self) -> TimedSchedule | None:
        """The schedule if it is a :class:`TimedSchedule`, checked once per schedule object.

        ``isinstance`` with a runtime-checkable protocol inspects every member (tens of
        microseconds), and the monitor asks at every training step.
        """
        schedule = self.schedule
        if getattr(self, "_timed_checked", None) is not schedule:
            self._timed_checked = schedule
            self._timed_schedule = schedule if isinstance(schedule, TimedSchedule) else None
        return self._timed_schedule


__all__ = ["IMAGE_EVERY", "ResultSink"]
