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
  TensorBoard logging on) and a clock callback that records when each step starts
  (:mod:`benchmarks.lightning_cases`).
- ``fit``: ``Trainer.fit`` on digits without and with a default ``FisherMonitor()``
  (:mod:`benchmarks.lightning_cases`).
- ``report``: ``benchmarks/report_scale.py``'s ``main()`` on a synthetic run.

Usage: ``python -m benchmarks.worker CASE.json RESULT.json`` (``CASE.json`` holds the
case and the options, as written by :mod:`benchmarks.run`).
"""

from __future__ import annotations

import copy
import json
import os
import sys
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
from benchmarks.cases import CONFIGS, FLOORS, MODELS, ModelSpec  # noqa: E402
from benchmarks.lightning_cases import callback_case, fit_case  # noqa: E402
from benchmarks.lightning_cases import step_costs as step_costs  # noqa: E402  (re-exported)
from benchmarks.measurement_info import describe  # noqa: E402

#: Import ``fisher_monitor`` from this directory instead (``run.py --baseline``: the same
#: cases on another checkout, in the same run).
PACKAGE = os.environ.get("FISHER_BENCH_PACKAGE")
if PACKAGE:
    sys.path.insert(0, PACKAGE)


#: Budgets of time (``Options.budget``) up to which a case is repeated ``min_repeats`` times.
MIN_REPEATS_BUDGETS = 3.0


@dataclass(frozen=True)
class Options:
    """How hard to try.

    Attributes:
        device: ``"cpu"`` or ``"cuda"``.
        limit: A call longer than this (seconds) ends the case's repetitions; after a
            one-shot ``measure()`` that long, the prepared call is skipped too.
        budget: Seconds of repetitions per case after the first (at most ``repeats``).
        repeats: Most repetitions of each call.
        min_repeats: Fewest repetitions of each call (a median of two is their mean, and
            the first call also probes memory), while the repetitions take less than
            :data:`MIN_REPEATS_BUDGETS` budgets and no call exceeds ``limit``.
        warm_steps: Plain steps before each timed call (the first is not counted).
        measurements: Callback case: measurements timed after the first.
        every: Callback case: measure every this many steps.
        threads: ``torch.set_num_threads`` in the worker (``0``: torch's default).
    """

    device: str = "cpu"
    limit: float = 60.0
    budget: float = 10.0
    repeats: int = 9
    min_repeats: int = 3
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


def one_shot_call(context: Setup, structures: tuple[str, ...], fisher: str) -> Callable:
    """``measure()`` of the context's model, as users call it (a fresh generator, seed 0).

    The returned function measures the context's batch, or the inputs and targets given.
    """
    from fisher_monitor.engine import measure

    def one_shot(x=context.inputs, y=context.targets):
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

    return one_shot


def interleave(
    context: Setup,
    calls: dict[str, Callable[[], None]],
    outcome: dict,
    probe: timing.PeakMemory,
    options: Options,
    result: Result,
) -> None:
    """Time ``calls`` in turn, each after warm plain steps, until stopped, repeated or over.

    The first repetition also records each call's peak extra memory and describes the
    measurement the one-shot call left in ``outcome``. A call over ``options.limit`` stops
    its repetitions; the ``Measurer`` is skipped when ``measure()`` stopped before it ran.
    """
    device, step = context.device, context.step
    samples = {name: timing.Samples() for name in calls}
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
        spent = time.perf_counter() - started
        if spent > options.budget and (
            repetition >= options.min_repeats or spent > MIN_REPEATS_BUDGETS * options.budget
        ):
            break


def measure_case(context: Setup, config: str, options: Options, result: Result) -> None:
    """One-shot ``measure()`` and a prepared ``Measurer`` call against warm plain steps."""
    from fisher_monitor.engine import Measurer
    from fisher_monitor.settings import MeasureSettings

    structures, fisher = CONFIGS[config]
    result["structures"], result["fisher"] = list(structures), fisher
    inputs, targets = context.inputs, context.targets
    one_shot = one_shot_call(context, structures, fisher)

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

    probe = timing.PeakMemory(context.device)
    result["memory_method"] = probe.method if probe.available else None

    result["step_peak_mb"] = step_peak(context, options, probe)
    interleave(context, {"measure": shot, "measurer": prepared}, outcome, probe, options, result)
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
