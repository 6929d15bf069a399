"""The cases of ``make bench`` that train with Lightning: ``{model}/callback`` and ``fit/…``.

- ``callback``: ``Trainer.fit`` with ``FisherMonitor`` (every ``every`` steps, its
  TensorBoard logging on) and a clock callback that records when each step starts; the
  cost of a measurement in Lightning steps comes from those start times
  (:func:`step_costs`).
- ``fit``: a ``Trainer.fit`` on scikit-learn's digits without the monitor, then with a
  default ``FisherMonitor()``.

``pytorch_lightning`` and ``fisher_monitor`` are imported inside the functions, as in
:mod:`benchmarks.worker`: the worker may import ``fisher_monitor`` from another checkout
(``run.py --baseline``), and the other cases do not pay for Lightning's import.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from benchmarks import timing
from benchmarks.cases import FITS, FitSpec
from benchmarks.measurement_info import describe

if TYPE_CHECKING:
    from benchmarks.worker import Options, Result, Setup


def lightning_module(net: nn.Module, optimizer: type[torch.optim.Optimizer]):
    """A ``LightningModule`` training ``net`` with cross-entropy and ``optimizer`` (lr 1e-3)."""
    import pytorch_lightning as pl

    class Module(pl.LightningModule):
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net
            self.loss_fn = nn.CrossEntropyLoss()

        def forward(self, inputs):
            return self.net(inputs)

        def training_step(self, batch, batch_idx):
            loss = self.loss_fn(self(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return optimizer(self.parameters(), lr=1e-3)

    return Module(net)


def step_clock(device: torch.device, options: Options, result: Result, monitor):
    """A callback that records when each training step starts (first in the callback list).

    It also records the steps at which ``monitor`` returned a measurement, saves the costs
    so far after each measurement and the step after it (kept if the case is killed), and
    stops the fit after the last warm step of a cycle once at least two measurements after
    the first are timed and the time budget is spent.
    """
    import pytorch_lightning as pl

    every, wanted = options.every, options.measurements

    class Clock(pl.Callback):
        """Records when each training step starts (first in the callback list)."""

        def __init__(self):
            self.starts: list[float] = []
            self.began = 0.0
            self.measured: list[int] = []  # steps at which the monitor returned a measurement
            self.last = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            timing.sync(device)
            now = time.perf_counter()
            if not self.starts:
                self.began = now
            self.starts.append(now)
            if len(self.starts) > every and len(self.starts) % every == 3 % every:
                # a measurement and the step after it are done: keep them, if killed later
                result["callback"] = step_costs(self.starts, self.measured, every, wanted)
                result.save("Trainer.fit with FisherMonitor")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            latest = getattr(monitor, "last_measurement", None)
            if latest is not None and latest is not self.last:
                self.measured.append(len(self.starts) - 1)
                self.last = latest
            # after the last warm step of a cycle (the next step would measure), with at
            # least two measurements after the first timed and the time budget spent
            finished = len(self.starts)  # steps 0 … finished − 1 have started
            later_measurements = (finished - 1) // every
            over = time.perf_counter() - self.began > options.budget
            if finished % every == 0 and later_measurements >= 2 and over:
                trainer.should_stop = True

    return Clock()


def callback_case(context: Setup, options: Options, result: Result) -> None:
    """``Trainer.fit`` with ``FisherMonitor`` and its TensorBoard logging, step by step.

    The extra cost of a measurement is the period (start to start) of the measured step
    plus that of the step after it, minus two warm Lightning steps: the measured step
    holds the measurement, its logging and the optimizer audit, and the next one pays for
    the caches the measurement evicted. Warm steps are those at least two steps after a
    measurement. The first measurement (step 0) is reported apart.
    """
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from fisher_monitor import FisherMonitor

    spec, device = context.spec, context.device
    every, wanted = options.every, options.measurements
    inputs, targets = spec.batch(8 * spec.batch_size, seed=1)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=spec.batch_size, shuffle=True)
    torch.manual_seed(0)
    net = copy.deepcopy(context.model)
    monitor = FisherMonitor(every_n_steps=every)
    clock = step_clock(device, options, result, monitor)
    with tempfile.TemporaryDirectory(prefix="fisher-bench-") as directory:
        trainer = pl.Trainer(
            max_steps=every * (wanted + 1),
            accelerator=device.type,
            devices=1,
            callbacks=[clock, monitor],
            logger=pl.loggers.TensorBoardLogger(directory),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=50,
        )
        result.save("Trainer.fit with FisherMonitor")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(lightning_module(net, torch.optim.SGD), loader)
    monitor_warnings = [str(w.message) for w in caught if "FisherMonitor" in str(w.message)]
    if monitor_warnings:
        result["warnings"] = [text.splitlines()[0][:300] for text in monitor_warnings[:3]]
    result["callback"] = step_costs(clock.starts, clock.measured, every, wanted)
    measurement = getattr(monitor, "last_measurement", None)
    if measurement is not None:
        result["measurement"] = describe(measurement, spec.batch_size)
    if not result["callback"]["runs"]:
        cause = monitor_warnings[0].strip().splitlines()[0] if monitor_warnings else "no warning"
        raise RuntimeError(f"the monitor measured nothing: {cause}")


def step_costs(starts: list[float], measured: list[int], every: int, wanted: int) -> dict:
    """Cost of each measurement from the start times of the training steps.

    Steps ``0, every, 2·every, …`` are scheduled to measure. Warm steps are those at least
    two steps after a scheduled one; the cost of a measurement is its step's period plus
    the next step's, minus two warm steps, counted only where the monitor returned a
    measurement. The first measurement (step 0) is reported apart.

    Args:
        starts: ``time.perf_counter()`` at the start of each step.
        measured: The steps at which the monitor returned a measurement.
        every: Measurement interval in steps.
        wanted: Measurements after the first the run was asked for.

    Returns:
        ``runs`` (measurements costed after the first), ``step_ms`` (the warm Lightning
        step), ``ms`` and ``ratio`` (mean cost, in ms and in warm steps),
        ``median_ratio``, ``first_ms``, ``steps``, ``every``, ``stopped``.
    """
    periods = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    warm = [period for index, period in enumerate(periods) if index % every >= 2]
    step = statistics.median(warm) if warm else None
    done = set(measured)
    extras = [
        periods[index] + periods[index + 1] - 2 * step
        for index in range(every, len(periods) - 1, every)
        if step is not None and index in done
    ]
    first = None
    if step is not None and len(periods) > 1 and 0 in done:
        first = periods[0] + periods[1] - 2 * step
    return {
        "runs": len(extras),
        "step_ms": 1e3 * step if step is not None else None,
        "first_ms": 1e3 * first if first is not None else None,
        "ms": 1e3 * statistics.mean(extras) if extras else None,
        "ratio": statistics.mean(extras) / step if extras else None,
        "median_ratio": statistics.median(extras) / step if extras else None,
        "steps": len(starts),
        "every": every,
        "stopped": "" if len(extras) >= wanted else f"{len(extras)} of {wanted} measurements",
    }


def timed_fit(spec: FitSpec, dataset, monitor, steps: int) -> float:
    """Seconds of a ``Trainer.fit`` of ``spec``'s network (seed 0, Adam) for ``steps`` steps.

    Args:
        spec: The fit.
        dataset: The digits, as a ``TensorDataset``.
        monitor: A ``FisherMonitor`` among the callbacks, or ``None`` for a plain fit.
        steps: Optimizer steps.
    """
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    net = spec.build()
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(dataset, batch_size=spec.batch_size, shuffle=True, generator=generator)
    with tempfile.TemporaryDirectory(prefix="fisher-bench-fit-") as directory:
        trainer = pl.Trainer(
            max_steps=steps,
            accelerator="cpu",
            devices=1,
            callbacks=[monitor] if monitor is not None else [],
            logger=pl.loggers.TensorBoardLogger(directory),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=50,
        )
        started = time.perf_counter()
        trainer.fit(lightning_module(net, torch.optim.Adam), loader)
        return time.perf_counter() - started


#: Pairs of fits (without, then with the monitor) of a ``fit/…`` case: one pair's wall-clock
#: difference varies by about 0.15 s on the digits MLP (an empty callback's cost is below
#: that), as much as the difference itself; the medians are reported. With three pairs the
#: accounting check swung between 14% and 40% apart on the same code; five steady it.
FIT_REPETITIONS = 5


def fit_case(what: str, result: Result) -> None:
    """``Trainer.fit`` on digits without the monitor, then with a default ``FisherMonitor()``.

    :data:`FIT_REPETITIONS` pairs, alternating. Records the median wall time without the
    monitor and the median run with it: its wall time, the measurements the monitor took,
    the share of the fit's time it reports (its ledger, as the end-of-fit summary and
    ``probe/overhead`` state it) and the share the wall-clock increase implies.
    """
    from sklearn.datasets import load_digits
    from torch.utils.data import TensorDataset

    from fisher_monitor import FisherMonitor

    spec = FITS[what]
    data, labels = load_digits(return_X_y=True)
    inputs = torch.tensor(data / 16.0, dtype=torch.float32)
    if spec.image:
        inputs = inputs.view(-1, 1, 8, 8)
    dataset = TensorDataset(inputs, torch.tensor(labels))

    result.save("short fits (warm-up: imports, first calls)")
    timed_fit(spec, dataset, None, 20)
    timed_fit(spec, dataset, FisherMonitor(), 20)
    result["fit"] = {"title": spec.title, "steps": spec.steps, "repetitions": FIT_REPETITIONS}
    plain, runs = [], []
    for repetition in range(FIT_REPETITIONS):  # alternating, so that drifts hit both alike
        result.save(f"fit without the monitor ({repetition + 1} of {FIT_REPETITIONS})")
        plain.append(timed_fit(spec, dataset, None, spec.steps))
        result.save(f"fit with FisherMonitor() ({repetition + 1} of {FIT_REPETITIONS})")
        monitor = FisherMonitor()
        seconds = timed_fit(spec, dataset, monitor, spec.steps)
        ledger = monitor._ledger
        runs.append((seconds, ledger.spent, ledger.elapsed, len(monitor._history)))
    plain_seconds = statistics.median(plain)
    monitored, spent, elapsed, measured = sorted(runs)[len(runs) // 2]  # the median run
    result["fit"].update(
        {
            "plain_seconds": plain_seconds,
            "monitored_seconds": monitored,
            "measurements": measured,
            "reported_seconds": spent,
            "reported_share": spent / elapsed if elapsed > 0 else None,
            "increase_seconds": monitored - plain_seconds,
            "increase_share": (monitored - plain_seconds) / monitored if monitored > 0 else None,
        }
    )
