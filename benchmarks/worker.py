"""One case of ``make bench``, run in a fresh process (``python -m benchmarks.worker``).

A fresh process per case gives each its own memory high-water mark and allocator, and
keeps a crash, an out-of-memory kill or a runaway case from taking the others with it.
The worker writes its result as JSON after every phase, so that the harness still has
the finished part when it has to kill a case at its hard time limit.

Kinds of case (see :mod:`benchmarks.cases`):

- ``measure``: one-shot ``measure()`` and a prepared ``Measurer`` call, each preceded by
  warm plain SGD steps (:func:`benchmarks.timing.warm_step`), repeated while the case's
  time budget lasts; the first repetition also records the peak extra memory of each
  call. A two-sample ``measure()`` first loads the code paths, so that one-time import
  and dispatch costs are not charged to the first timed call; the ``Measurer`` is
  prepared (its network copied and converted) before its first timed call.
- ``floor``: BackPACK's own extensions on the same batch, timed the same way.
- ``callback``: ``Trainer.fit`` with ``FisherMonitor`` (every ``every`` steps, its
  TensorBoard logging on) and a clock callback that records when each step starts.
- ``report``: ``benchmarks/report_scale.py``'s ``main()`` on a synthetic run.

Usage: ``python -m benchmarks.worker CASE.json RESULT.json`` (``CASE.json`` holds the
case and the options, as written by :mod:`benchmarks.run`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import timing  # noqa: E402
from benchmarks.cases import CONFIGS, FITS, FLOORS, MODELS, ModelSpec  # noqa: E402

#: Import ``fisher_monitor`` from this directory instead (``run.py --baseline``: the same
#: cases on another checkout, in the same run).
PACKAGE = os.environ.get("FISHER_BENCH_PACKAGE")
if PACKAGE:
    sys.path.insert(0, PACKAGE)


@dataclass(frozen=True)
class Options:
    """How hard to try.

    Attributes:
        device: ``"cpu"`` or ``"cuda"``.
        limit: A call longer than this (seconds) ends the case's repetitions; after a
            one-shot ``measure()`` that long, the prepared call is skipped too.
        budget: Seconds of repetitions per case after the first (at most ``repeats``).
        repeats: Most repetitions of each call.
        warm_steps: Plain steps before each timed call (the first is not counted).
        measurements: Callback case: measurements timed after the first.
        every: Callback case: measure every this many steps.
        threads: ``torch.set_num_threads`` in the worker (``0``: torch's default).
    """

    device: str = "cpu"
    limit: float = 60.0
    budget: float = 10.0
    repeats: int = 9
    warm_steps: int = 4
    measurements: int = 10
    every: int = 6
    threads: int = 0

    @classmethod
    def from_dict(cls, data: dict) -> Options:
        """Options from plain data (unknown keys ignored)."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class Result(dict):
    """The case's result, written to ``path`` after every phase."""

    def __init__(self, path: Path | None, **fields):
        super().__init__(**fields)
        self.path = path

    def save(self, phase: str | None = None) -> None:
        """Write atomically (the harness may read it after killing the process).

        Args:
            phase: What the case does next (named if it is killed there).
        """
        if phase is not None:
            self["phase"], self["phase_time"] = phase, time.time()
        if self.path is None:
            return
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self, default=str))
        os.replace(partial, self.path)


def one_line(error: BaseException) -> str:
    """``"Type: first line of the message"``, at most 200 characters."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= 200 else text[:199] + "…"


# --------------------------------------------------------------------------- models


@dataclass
class Setup:
    """A model with its batch, loss and plain SGD step, ready to time."""

    spec: ModelSpec
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    loss_fn: nn.Module
    step: Callable[[], None]
    device: torch.device
    info: dict


def setup(spec: ModelSpec, device: torch.device) -> Setup:
    """Build the model (seed 0) and its batch; fit it first for a fitted-regime case."""
    torch.manual_seed(0)
    model = spec.build().to(device)
    inputs, targets = (t.to(device) for t in spec.batch())
    loss_fn = nn.CrossEntropyLoss()
    info: dict = {"parameters": sum(p.numel() for p in model.parameters())}
    if spec.fitted:
        info.update(fit(model, loss_fn, inputs, targets, spec.fitted_loss))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad()
        loss_fn(model(inputs), targets).backward()
        optimizer.step()

    return Setup(spec, model, inputs, targets, loss_fn, step, device, info)


def fit(model, loss_fn, inputs, targets, threshold: float, most: int = 3000) -> dict:
    """Train with Adam on the one batch until its loss is below ``threshold``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for index in range(most):
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)
        if loss.item() < threshold:
            return {"fitted_in_steps": index, "fitted_loss": loss.item()}
        loss.backward()
        optimizer.step()
    return {"fitted_in_steps": most, "fitted_loss": loss.item()}


# --------------------------------------------------------------------------- cases


def grouped_notes(notes: list[str], most: int = 6) -> list[str]:
    """Notes with the same text after a layer name (``"bn1: BatchNorm …"``) counted once."""
    groups: dict[str, list[str]] = {}
    for note in notes:
        layer, separator, text = note.partition(": ")
        single = bool(separator) and " " not in layer
        groups.setdefault(text if single else note, []).append(layer if single else "")
    lines = []
    for text, layers in groups.items():
        named = [layer for layer in layers if layer]
        if len(named) > 1:
            text = f"{len(named)} layers ({named[0]}, …): {text}"
        elif named:
            text = f"{named[0]}: {text}"
        lines.append(text if len(text) <= 300 else text[:299] + "…")
    return lines[:most]


def headline_and_backends(measurement) -> dict:
    """The headline metrics missing at ``all``, the layers per backend, the solves' record."""
    from fisher_monitor import keys

    estimator = (getattr(measurement, "settings", None) or {}).get("estimator") or {}
    headline = ("direction_cosine", "nat_grad_cosine", "kl", "nat_projection")
    structures = {str(s) for s in getattr(measurement, "structures", ())}
    missing = [
        f"{structure}/{metric}"
        for structure in sorted(structures & {"diag", "block"})
        for metric in headline
        if keys.metric_key(structure, metric, "all") not in measurement.scalars
    ]
    per_layer: dict[str, list[str]] = {}
    for row in measurement.coverage:
        backend = str(row.get("backend")) if row.get("measured") else "not measured"
        per_layer.setdefault(backend, []).append(str(row.get("layer")))
    return {
        "headline_missing": missing,
        "layer_backends": per_layer,
        "exact_solves": estimator.get("exact_solves"),
    }


def describe(measurement, batch_size: int) -> dict:
    """What a measurement says about itself: probe size, backends, notes, standard errors."""
    from fisher_monitor import keys

    scalars = measurement.scalars
    probe = scalars.get(keys.probe_key("batch_size"))
    notes = [str(note) for note in measurement.notes]
    subsampled = (probe is not None and probe < batch_size) or any(
        "sub-sampled" in note or "retried with" in note for note in notes
    )
    backends = sorted(
        {str(row.get("backend")) for row in measurement.coverage if row.get("measured")}
    )
    unmeasured = [row.get("layer") for row in measurement.coverage if not row.get("measured")]
    worst, worst_key, estimates = 0.0, None, 0
    worst_all, worst_all_key = 0.0, None  # the whole network's keys only
    for key, value in scalars.items():
        parsed = keys.parse_key(key)
        if parsed is None or not parsed.stderr:
            continue
        estimates += 1
        suffix = f"@{parsed.damping}" if parsed.damping else ""
        estimate = scalars.get(
            keys.metric_key(parsed.structure, parsed.metric, parsed.layer, suffix)
        )
        if estimate is None:
            continue
        relative = abs(value) / abs(estimate) if estimate else float("inf")
        if math.isnan(relative):  # a nan estimate (e.g. a vanished gradient's cosine)
            continue
        if relative > worst or worst_key is None:
            worst, worst_key = relative, key
        if parsed.layer == "all" and (relative > worst_all or worst_all_key is None):
            worst_all, worst_all_key = relative, key
    cost = (getattr(measurement, "settings", None) or {}).get("cost") or {}
    return {
        **headline_and_backends(measurement),
        "cost_steps": cost.get("steps"),
        "cost_seconds": cost.get("seconds"),
        "probe_batch_size": probe,
        "subsampled": subsampled,
        "backends": backends,
        "unmeasured_layers": unmeasured,
        "notes": grouped_notes(notes),
        "estimates": estimates,
        "worst_relative_se": worst if estimates else None,
        "worst_se_key": worst_key,
        "worst_all_relative_se": worst_all if worst_all_key is not None else None,
        "worst_all_se_key": worst_all_key,
    }


def step_peak(context: Setup, options: Options, probe: timing.PeakMemory) -> float | None:
    """A warm plain step's own peak above the resident memory (MiB)."""
    timing.warm_step(context.step, context.device, options.warm_steps)
    probe.start()
    context.step()
    return probe.extra_megabytes()


def extra_over(peak: float | None, result: Result) -> float | None:
    """What a call adds to training's peak: its rise minus the plain step's own (MiB)."""
    if peak is None:
        return None
    return max(peak - (result.get("step_peak_mb") or 0.0), 0.0)


def measure_case(context: Setup, config: str, options: Options, result: Result) -> None:
    """One-shot ``measure()`` and a prepared ``Measurer`` call against warm plain steps."""
    from fisher_monitor.engine import Measurer, measure
    from fisher_monitor.settings import MeasureSettings

    structures, fisher = CONFIGS[config]
    result["structures"], result["fisher"] = list(structures), fisher
    device, step = context.device, context.step
    inputs, targets = context.inputs, context.targets

    def one_shot(x=inputs, y=targets):
        generator = torch.Generator().manual_seed(0)
        return measure(
            context.model,
            context.loss_fn,
            x,
            y,
            structures=structures,
            fisher=fisher,
            generator=generator,
        )

    # load the code paths on two samples: import and first-dispatch costs are not the case's
    result.save("measure() on 2 samples (warm-up)")
    one_shot(inputs[:2], targets[:2])
    result.save("preparing the Measurer")
    measurer = Measurer(context.model, context.loss_fn, MeasureSettings.create(structures, fisher))
    generator = torch.Generator().manual_seed(0)
    _ = measurer.prepared  # prepares the backend without measuring

    outcome: dict = {}

    def prepared():
        outcome["measurement"] = measurer(inputs, targets, generator=generator)

    def shot():
        outcome["measurement"] = one_shot()

    calls = {"measure": shot, "measurer": prepared}
    samples = {name: timing.Samples() for name in calls}
    probe = timing.PeakMemory(device)
    result["memory_method"] = probe.method if probe.available else None

    result["step_peak_mb"] = step_peak(context, options, probe)

    started = time.perf_counter()
    repetition = 0
    while True:
        for name, call in calls.items():
            if (
                samples["measure"].stopped
                and name == "measurer"
                and not samples["measurer"].seconds
            ):
                samples[name].stopped = "skipped: measure() exceeded the limit"
                result[name] = samples[name].summary()
                continue
            if samples[name].stopped:
                continue
            warm = timing.warm_step(step, device, options.warm_steps)
            result["timing"] = {"kind": name, "step_ms": 1e3 * warm}  # a bound if killed
            result.save(f"{'measure()' if name == 'measure' else 'Measurer'} call {repetition + 1}")
            if repetition == 0:
                probe.start()
            seconds = timing.timed(call, device)
            samples[name].add(seconds, warm)
            if repetition == 0:
                result[f"{name}_peak_mb"] = extra_over(probe.extra_megabytes(), result)
                if name == "measure":
                    result["measurement"] = describe(
                        outcome["measurement"], context.spec.batch_size
                    )
            if seconds > options.limit:
                samples[name].stopped = f"a call took {seconds:.0f} s > {options.limit:.0f} s"
            result[name] = samples[name].summary()
            result.save()
        repetition += 1
        done = all(s.stopped for s in samples.values())
        if done or repetition >= options.repeats:
            break
        if time.perf_counter() - started > options.budget:
            break
    measurer.close()


def floor_case(context: Setup, floor: str, options: Options, result: Result) -> None:
    """BackPACK's own extensions on a BackPACK-extended copy of the model."""
    import backpack
    import backpack.extensions as extensions

    names, result["computes"] = FLOORS[floor]
    converter = context.spec.name.startswith("resnet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # eval mode, as the engine measures BatchNorm: BackPACK refuses it in train mode
        model = backpack.extend(copy.deepcopy(context.model).eval(), use_converter=converter)
    loss_fn = backpack.extend(nn.CrossEntropyLoss())
    fields = ("diag_ggn_exact", "diag_ggn_mc", "sum_grad_squared", "kfac", "kflr")

    def call() -> None:
        model.zero_grad()
        with backpack.backpack(*(getattr(extensions, name)() for name in names)):
            loss_fn(model(context.inputs), context.targets).backward()
        for parameter in model.parameters():
            for name in fields:
                if hasattr(parameter, name):
                    delattr(parameter, name)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result.save("first BackPACK call (warm-up)")
        call()  # first call: BackPACK's dispatch
        samples = timing.Samples()
        probe = timing.PeakMemory(context.device)
        result["step_peak_mb"] = step_peak(context, options, probe)
        started = time.perf_counter()
        for repetition in range(options.repeats):
            warm = timing.warm_step(context.step, context.device, options.warm_steps)
            result["timing"] = {"kind": "floor", "step_ms": 1e3 * warm}
            result.save(f"BackPACK call {repetition + 1}")
            if repetition == 0:
                probe.start()
            seconds = timing.timed(call, context.device)
            samples.add(seconds, warm)
            if repetition == 0:
                result["floor_peak_mb"] = extra_over(probe.extra_megabytes(), result)
            if seconds > options.limit:
                samples.stopped = f"a call took {seconds:.0f} s > {options.limit:.0f} s"
            result["floor"] = samples.summary()
            result.save()
            if samples.stopped or time.perf_counter() - started > options.budget:
                break


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
            return torch.optim.SGD(self.parameters(), lr=1e-3)

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

    inputs, targets = spec.batch(8 * spec.batch_size, seed=1)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=spec.batch_size, shuffle=True)
    torch.manual_seed(0)
    net = copy.deepcopy(context.model)
    monitor = FisherMonitor(every_n_steps=every)
    clock = Clock()
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
            trainer.fit(Module(net), loader)
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


def fit_case(what: str, result: Result) -> None:
    """A ``Trainer.fit`` on digits without the monitor, then with a default ``FisherMonitor()``.

    Records the wall time of each, the measurements the monitor took, the share of the
    fit's time it reports (its ledger, as the end-of-fit summary and ``probe/overhead``
    state it) and the share the wall-clock increase implies.
    """
    import pytorch_lightning as pl
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, TensorDataset

    from fisher_monitor import FisherMonitor

    spec = FITS[what]
    data, labels = load_digits(return_X_y=True)
    inputs = torch.tensor(data / 16.0, dtype=torch.float32)
    if spec.image:
        inputs = inputs.view(-1, 1, 8, 8)
    dataset = TensorDataset(inputs, torch.tensor(labels))

    class Module(pl.LightningModule):
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net
            self.loss_fn = nn.CrossEntropyLoss()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            loss = self.loss_fn(self(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    def fit(monitor: FisherMonitor | None, steps: int = spec.steps) -> float:
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
            trainer.fit(Module(net), loader)
            return time.perf_counter() - started

    result.save("short fits (warm-up: imports, first calls)")
    fit(None, 20)
    fit(FisherMonitor(), 20)
    result.save("fit without the monitor")
    plain = fit(None)
    result["fit"] = {"title": spec.title, "steps": spec.steps, "plain_seconds": plain}
    result.save("fit with FisherMonitor()")
    monitor = FisherMonitor()
    monitored = fit(monitor)
    ledger = monitor._ledger
    measured = len(monitor._history)
    result["fit"].update(
        {
            "monitored_seconds": monitored,
            "measurements": measured,
            "reported_seconds": ledger.spent,
            "reported_share": ledger.spent / ledger.elapsed if ledger.elapsed > 0 else None,
            "increase_seconds": monitored - plain,
            "increase_share": (monitored - plain) / monitored if monitored > 0 else None,
        }
    )


def report_case(what: str, result: Result) -> None:
    """``benchmarks/report_scale.py`` on one ``{layers}x{measurements}`` run."""
    from benchmarks import report_scale

    rows = report_scale.main(["--cases", what])
    row = rows[0]
    result["report"] = {
        "seconds": row["seconds"],
        "peak_mb": row["peak_mb"],
        "events_mb": row["events_mb"],
        "returncode": row["returncode"],
    }
    if row["returncode"]:
        raise RuntimeError(f"fisher-monitor report exited with code {row['returncode']}")


def run_case(case: dict, options: Options, path: Path | None = None) -> dict:
    """Run one case; an exception becomes ``status: "failed"`` with its first line.

    Args:
        case: ``{"name", "kind", "model", "what"}`` (:meth:`benchmarks.cases.Case.to_dict`).
        options: How hard to try.
        path: Where to write the result after each phase (``None``: nowhere).

    Returns:
        The result: ``status`` (``"ok"`` or ``"failed"``), ``error``, ``seconds`` and the
        kind's own fields.
    """
    if options.threads:
        torch.set_num_threads(options.threads)
    result = Result(path, **case, status="running", threads=torch.get_num_threads())
    result["load"] = [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []
    started = time.perf_counter()
    try:
        if case["kind"] == "report":
            result.save("fisher-monitor report")
            report_case(case["what"], result)
        elif case["kind"] == "fit":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fit_case(case["what"], result)
        else:
            device = torch.device(options.device)
            result.save(
                "building the model" + (" and fitting it" if MODELS[case["model"]].fitted else "")
            )
            context = setup(MODELS[case["model"]], device)
            result["setup"] = context.info
            result.save()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if case["kind"] == "measure":
                    measure_case(context, case["what"], options, result)
                elif case["kind"] == "floor":
                    floor_case(context, case["what"], options, result)
                elif case["kind"] == "callback":
                    callback_case(context, options, result)
                else:
                    raise ValueError(f"Invalid case kind: {case['kind']!r}.")
        result["status"] = "ok"
    except Exception as error:  # noqa: BLE001 - recorded in the table, the others go on
        result["status"] = "failed"
        result["error"] = one_line(error)
        result["traceback"] = traceback.format_exc(limit=-6)
    result["seconds"] = time.perf_counter() - started
    if hasattr(os, "getloadavg"):
        result["load"].append(os.getloadavg()[0])
    result.pop("phase", None)
    result.save()
    return dict(result)


def main(argv: list[str] | None = None) -> int:
    """Read the case and options from ``argv[0]``, write the result to ``argv[1]``."""
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    result = run_case(spec["case"], Options.from_dict(spec["options"]), Path(argv[1]))
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
