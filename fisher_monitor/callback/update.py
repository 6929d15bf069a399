"""The update the optimizer really applies after a measurement, for the optimizer audit.

At a measured step the monitor copies the measured layers' parameters and registers a
one-shot ``register_step_post_hook`` on the audited optimizer (the first, or the one named
by ``optimizer_index``). When it next steps — after the last micro-batch of a gradient
accumulation window, with whatever learning-rate schedule, weight decay, momentum,
clipping or parameter groups, in automatic or manual optimization — the hook takes
``Δθ = θ_after − θ_before``, frees the copy, removes itself, and hands ``Δθ`` to
:mod:`fisher_monitor.audit`. The hook only reads the parameters; training is unchanged.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fisher_monitor import audit
from fisher_monitor.measurement import Measurement

#: ``(step, scalars, {histogram group: {layer: values}}, notes, seconds)`` → None
Report = Callable[[int, dict[str, float], dict[str, dict[str, np.ndarray]], list[str], float], None]


def measurer_keeps_directions(measurer: Any) -> bool:
    """Whether the measurer accepts ``keep_directions=True`` (needed for the step audit)."""
    return "keep_directions" in inspect.signature(measurer.__call__).parameters


def audited_optimizer(
    optimizers: list[torch.optim.Optimizer], index: int, enabled: bool
) -> torch.optim.Optimizer | None:
    """The optimizer to audit: ``optimizers[index]``, or ``None`` (off or absent)."""
    if not enabled or index >= len(optimizers):
        return None
    return optimizers[index]


def has_second_moment(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether the preconditioner audit applies (an optimizer with a second moment).

    Decided from the class before the first step, when the optimizer has no state yet.
    """
    return optimizer is not None and audit.has_second_moment(optimizer)


@dataclass
class _Pending:
    step: int
    measurement: Measurement
    optimizer: torch.optim.Optimizer
    parameters: dict[str, nn.Parameter]  # every measured parameter, by qualified name
    before: dict[str, Tensor]  # their values at the measurement
    handle: Any


class UpdateRecorder:
    """Record the optimizer's applied update after a measurement and audit it.

    Args:
        report: Called with ``(step, scalars, histograms, notes, seconds)`` once the update
            is known (inside the optimizer's step).
        on_error: Called with the exception when the audit fails (the failure policy).
        clock: Time source in seconds (the monitor's).
    """

    def __init__(
        self,
        report: Report,
        on_error: Callable[[int, BaseException], None],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.report = report
        self.on_error = on_error
        self.clock = clock
        self._pending: _Pending | None = None

    @property
    def armed(self) -> bool:
        """Whether an update is awaited."""
        return self._pending is not None

    def arm(
        self,
        optimizer: torch.optim.Optimizer,
        network: nn.Module,
        measurement: Measurement,
        step: int,
    ) -> None:
        """Copy the measured parameters and wait for the optimizer's next step.

        The update is what changed between now and the end of that step: with several
        optimizers (manual optimization), audit the one that steps last to see the whole
        step. A previous update still awaited (a step skipped, e.g. by a mixed-precision
        scaler) is dropped.
        """
        self.disarm()
        named = dict(network.named_parameters())
        parameters = {
            name: named[name]
            for layer in measurement.layers
            for name in layer.parameter_names
            if name in named
        }
        if not parameters:
            return
        with torch.no_grad():
            before = {name: p.detach().clone() for name, p in parameters.items()}
        handle = optimizer.register_step_post_hook(self._hook)
        self._pending = _Pending(step, measurement, optimizer, parameters, before, handle)

    def disarm(self) -> None:
        """Stop waiting; free the copy and remove the hook."""
        if self._pending is not None:
            self._pending.handle.remove()
            self._pending = None

    def _hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        pending = self._pending
        self.disarm()
        if pending is None:
            return
        start = self.clock()
        try:
            scalars, histograms, notes = self._audit(pending)
        except Exception as error:  # noqa: BLE001 - the policy decides (strict mode raises)
            self.on_error(pending.step, error)
            return
        finally:
            pending.measurement.directions.clear()  # only the audit needed them
        self.report(pending.step, scalars, histograms, notes, self.clock() - start)

    @staticmethod
    def _audit(
        pending: _Pending,
    ) -> tuple[dict[str, float], dict[str, dict[str, np.ndarray]], list[str]]:
        with torch.no_grad():
            update = {
                name: pending.parameters[name].detach() - before
                for name, before in pending.before.items()
            }
            pending.before.clear()
            scalars = dict(audit.update_cosines(pending.measurement, update))
            del update
            histograms: dict[str, dict[str, np.ndarray]] = {}
            notes: list[str] = []
            found = audit.preconditioner_audit(
                pending.optimizer, pending.parameters, pending.measurement
            )
            if found is not None:
                scalars.update(found.scalars)
                histograms["log10_preconditioner_over_sqrt_f"] = {
                    layer: _finite(values) for layer, values in found.log_ratios.items()
                }
                notes = list(found.notes)
        return scalars, histograms, notes


def _finite(values: Tensor) -> np.ndarray:
    flat = values.detach().float().reshape(-1).cpu()
    return flat[torch.isfinite(flat)].numpy()
