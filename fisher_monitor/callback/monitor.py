"""FisherMonitor: log, as training goes, how far the empirical Fisher is from the Fisher."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks.callback import Callback
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from typing_extensions import override

from fisher_monitor import distributed, keys, validation
from fisher_monitor.backends import check_backend
from fisher_monitor.callback import arguments, summary
from fisher_monitor.callback.batches import ProbeSource, default_batch_to_inputs_targets
from fisher_monitor.callback.collective import measure_everywhere, shared_causes
from fisher_monitor.callback.discovery import LossDiscovery, find_network, loss_text, network_name
from fisher_monitor.callback.failures import FailurePolicy, never_raises
from fisher_monitor.callback.history import History
from fisher_monitor.callback.results import IMAGE_EVERY, ResultSink
from fisher_monitor.callback.timing import Ledger, charged, dispatch_seconds
from fisher_monitor.callback.update import (
    UpdateRecorder,
    has_second_moment,
    measurer_keeps_directions,
)
from fisher_monitor.callback.writer_registry import writers_for
from fisher_monitor.callback.writers import (
    RunInfo,
    WriterGroup,
)
from fisher_monitor.engine import Measurer
from fisher_monitor.engine.cost import check_estimator
from fisher_monitor.likelihoods import resolve_loss
from fisher_monitor.measurement import Measurement
from fisher_monitor.report.headline import check_use
from fisher_monitor.report.text import terminal_safe
from fisher_monitor.schedules import Schedule
from fisher_monitor.settings import MeasureSettings

#: Default logging prefix. TensorBoard's Time Series and Scalars pages list tag groups in
#: character order and open only the first two; "~" sorts after letters, digits and "_", so
#: the user's own curves come first and the monitor's group last (checked in Chromium).
DEFAULT_LOG_PREFIX = "~fisher"

try:  # the same class also serves `lightning.pytorch.Trainer` when that package is installed
    from lightning.pytorch.callbacks.callback import Callback as _LightningCallback

    _BASES: tuple[type, ...] = (Callback, _LightningCallback)
except ImportError:  # pragma: no cover - `lightning` is optional
    _BASES = (Callback,)


class FisherMonitor(ResultSink, *_BASES):
    r"""Log how far the empirical Fisher (EF) is from the Fisher (F) as training goes.

    At the steps its schedule chooses, at ``on_train_batch_start`` (the parameters and the
    batch the optimizer is about to use), the callback measures F and EF of the network on
    a probe batch (:class:`fisher_monitor.Measurer`) and logs the comparison; after that
    step's ``optimizer.step()`` it compares the update the optimizer applied with the
    natural-gradient step (the optimizer audit). It never changes training (a shadow copy
    sharing the parameters' storage, its own random generator) and never stops it: a
    failure becomes one warning naming the cause and the fix (see ``raise_on_error``), and
    a logger that fails to write (its directory deleted or read-only, a full disk) is
    dropped with one warning while the others keep receiving every measurement (with no
    logger left, a single process switches the monitor off). One
    line says what is measured when fitting starts; a table sums up when it ends. The
    definitions are in the documentation's theory page (``docs/theory.md``), the usage in
    the callback guide (``docs/guide/callback.md``).

    This class only holds Lightning's hooks and the state; the work is done by the modules
    of :mod:`fisher_monitor.callback` (batches, discovery, collective, failures, update,
    writers, tensorboard, summary), which is why it is longer than most.

    Args:
        every_n_steps: Shorthand for ``schedule=schedules.every(every_n_steps)``.
        schedule: A callable ``step -> bool`` over ``trainer.global_step``; default
            ``schedules.budget(fraction=0.05)``: 8 measurements spread over a fit of known
            length, and beyond those as often as 5% of the training time allows, densest
            early (see :class:`fisher_monitor.schedules.budget`).
        structures: Any of ``"diag"``, ``"block"``, ``"kron"``.
        fisher: ``"exact"`` or ``"mc"`` (sampled labels).
        mc_samples: Sampled labels per input for ``fisher="mc"``.
        damping: λ, or a sequence of values (damped metrics are then logged per value, ``@λ``).
        damping_mode: ``"relative"`` (λ_b = damping · tr F_b / D_b per layer) or ``"absolute"``.
        network: What to measure: ``None`` for the LightningModule (or, when it defines no
            ``forward``, the one submodule holding all trainable parameters), an attribute
            name (dotted paths allowed) such as ``"net"``, or a callable ``module -> nn.Module``.
        loss_fn: The negative log-likelihood: ``None`` finds the loss ``training_step``
            computes by recording the first measured step (functional losses and loss
            modules; see the callback guide), else a loss module attribute; or a
            ``CrossEntropyLoss``, ``NLLLoss``, ``MSELoss`` or ``BCEWithLogitsLoss``; or
            ``"cross_entropy"``, ``"nll"``, ``"mse"``, ``"bce_with_logits"``.
        batch_to_inputs_targets: Callable ``batch -> (inputs, targets)`` (inputs: a tensor,
            a tuple of positional or a dict of keyword arguments; targets per sample, e.g.
            ``(N, T)``); ``None`` derives it from the recorded step, else splits
            ``(inputs, targets, ...)`` tuples and dicts with the usual keys.
        outputs: The loss's input from the network's output, classes on dimension 1, e.g.
            ``lambda out: out.logits[:, :-1].transpose(1, 2)``; ``None`` derives it from
            the recorded step, else takes a tensor, a ``ModelOutput``'s ``logits`` or a
            tuple's first element.
        probe_size: Measure on at most this many samples of the batch (per process).
        probe_data: A fixed probe set instead of the training batch: a ``DataLoader`` (its
            first batch, taken once) or an ``(inputs, targets)`` pair.
        backend: ``"auto"`` (BackPACK where it can, else the autograd backend, else
            ``torch.func``), ``"backpack"``, ``"autograd"`` or ``"functorch"``.
        memory_budget: Peak bytes of one measurement: an int, a size such as ``"1GB"``
            (powers of 1000) or ``"512MiB"`` (powers of 1024), or ``None`` for half the
            available memory. A larger probe is sub-sampled, and the notes say so.
        estimator: ``"auto"`` (the exact Fisher while it is affordable, a sketch of it with
            standard errors for many classes; ``docs/theory.md#estimators``), ``"exact"``
            or ``"sketch"``.
        solve_budget: Training steps the exact-Fisher solves of a sketched measurement may
            cost (``kl``, ``direction_cosine``, ``nat_grad_cosine`` and ``nat_projection`` of
            ``block`` for many classes; ``None``: 40,000; ``0``: never; ``float("inf")``:
            always). Beyond it those metrics are left out, with a note giving the cost;
            within it, the schedule spaces the measurements by their time.
        log_prefix: Prefix of every logged key. The default ``"~fisher"`` sorts after your
            own tags in TensorBoard, so your curves stay on top.
        log_histograms: Histograms per layer (TensorBoard).
        log_images: The heat map of the direction cosine, layers × steps (TensorBoard).
        prog_bar: Key(s) without the prefix, e.g. ``"block/direction_cosine/all"``, to show
            on the progress bar.
        seed: Seed of the monitor's own generator (label sampling, dropout masks).
        raise_on_error: Raise instead of warning when preparing or measuring fails.
        audit_optimizer: Audit the optimizer: its applied update against the natural
            gradient and, for optimizers with a second moment, its preconditioner.
        optimizer_index: Which of ``trainer.optimizers`` to audit (manual optimization with
            several optimizers).
        use: How you rely on curvature, for the verdicts' headline: ``"adam"`` (an
            optimizer with a second moment), ``"sgd"``, ``"kfac"`` (a K-FAC/Shampoo-style
            preconditioner) or ``"laplace"`` (a Laplace approximation, TIC or another
            uncertainty estimate); ``None`` infers it from the optimizer's class.

    Logged keys (``{prefix}`` is ``log_prefix``), at ``trainer.global_step``, on rank zero:

    - ``{prefix}/{structure}/{metric}/{layer}`` and ``…/all`` for ``trace_ratio``,
      ``rel_error``, ``matrix_cosine``, ``kl``, ``direction_cosine``, ``nat_grad_cosine``,
      ``ef_grad_cosine``, ``nat_projection``, ``ef_projection``,
      ``ef_projection_per_sample`` and, with relative damping, ``damping`` (``{metric}@{λ}``
      with several dampings); standard errors of estimated values as ``{metric}_se``;
    - ``{prefix}/{structure}/update_nat_cosine/…``, ``update_ef_cosine``,
      ``update_grad_cosine`` and ``{prefix}/optimizer/preconditioner_fisher_cosine/…``,
      ``preconditioner_ef_cosine`` (the optimizer audit, after the step's optimizer step);
    - ``{prefix}/probe/loss``, ``batch_size``, ``grad_norm``, ``seconds`` and ``overhead``
      (the cumulative share of the fit's wall time spent in the monitor).

    Constants are settings, not time series: the settings, each layer's
    ``{prefix}/dimension/{layer}`` and (absolute damping) λ go to every logger through
    ``log_hyperparams``. A value that is not a number is not logged. With a
    ``TensorBoardLogger`` the scalars carry one-line descriptions, and the writer adds a
    Custom Scalars layout, histograms ``{prefix}/histograms/log10_ef_over_f/{layer}`` and
    ``…/log10_preconditioner_over_sqrt_f/{layer}``, the image
    ``{prefix}/images/direction_cosine`` (every tenth measurement and at the end, from two
    measurements on), the text
    ``{prefix}/settings``, and the run file ``fisher_monitor-{prefix}.json``
    (:mod:`fisher_monitor.runinfo`).

    Raises:
        MisconfigurationException: At setup, with ``Trainer(logger=False)``.
        ValueError: At construction, for invalid arguments (the message names the argument,
            the value and what is allowed).
        Exception: With ``raise_on_error=True``, whatever preparing or measuring raised
            (e.g. ``ValueError`` when no loss is found, ``NotImplementedError`` for a
            network the backend cannot handle).

    Example::

        >>> from pytorch_lightning import Trainer
        >>> from fisher_monitor import FisherMonitor
        >>> trainer = Trainer(callbacks=[FisherMonitor()])
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        schedule: Schedule | None = None,
        structures: Sequence[str] | str = ("diag", "block"),
        fisher: str = "exact",
        mc_samples: int = 1,
        damping: float | Sequence[float] = 1e-3,
        damping_mode: str = "relative",
        network: str | Callable[[Any], nn.Module] | None = None,
        loss_fn: nn.Module | str | None = None,
        batch_to_inputs_targets: Callable[[Any], tuple[Any, Tensor]] | None = None,
        outputs: Callable[[Any], Tensor] | None = None,
        probe_size: int | None = None,
        probe_data: Any = None,
        backend: str = "auto",
        memory_budget: int | str | None = None,
        estimator: str = "auto",
        solve_budget: float | None = None,
        log_prefix: str = DEFAULT_LOG_PREFIX,
        log_histograms: bool = True,
        log_images: bool = True,
        prog_bar: str | Sequence[str] | None = None,
        seed: int = 0,
        raise_on_error: bool = False,
        audit_optimizer: bool = True,
        optimizer_index: int = 0,
        use: str | None = None,
    ) -> None:
        self.settings = MeasureSettings.create(
            structures, fisher, mc_samples, damping, damping_mode
        )
        self.schedule: Schedule = arguments.check_schedule(every_n_steps, schedule)
        self.network = arguments.check_network(network)
        if loss_fn is not None:
            resolve_loss(loss_fn)  # fail early on unsupported losses
        self.loss_fn = loss_fn
        splitter = arguments.check_callable(
            "batch_to_inputs_targets", batch_to_inputs_targets, "lambda batch: (inputs, targets)"
        )
        self.batch_to_inputs_targets = splitter or default_batch_to_inputs_targets
        self.outputs = arguments.check_callable("outputs", outputs, "lambda out: out.logits")
        self.probe_size = arguments.check_probe_size(probe_size)
        self.probe_data = arguments.check_probe_data(probe_data)
        self._discovery = LossDiscovery(loss_fn, splitter is not None, probe_data, outputs)
        self.backend = check_backend(backend)
        self.memory_budget = validation.check_memory_budget(memory_budget)
        self.estimator = check_estimator(estimator)
        self.solve_budget = validation.check_solve_budget(solve_budget)
        self.log_prefix = arguments.check_prefix(log_prefix)
        self.log_histograms = arguments.check_flag("log_histograms", log_histograms)
        self.log_images = arguments.check_flag("log_images", log_images)
        self.prog_bar = arguments.check_prog_bar(prog_bar, self.settings, self.log_prefix)
        self.seed = arguments.check_seed(seed)
        self.raise_on_error = arguments.check_flag("raise_on_error", raise_on_error)
        self.audit_optimizer = arguments.check_flag("audit_optimizer", audit_optimizer)
        self.optimizer_index = arguments.check_whole("optimizer_index", optimizer_index, 0)
        self.use = check_use(use)
        self._start_state()

    def _start_state(self) -> None:
        """The monitor's own state before a fit: clock, generator, history, writers."""
        timed = self._timed()
        clock = timed.clock if timed is not None else None
        self._ledger = Ledger(clock or time.perf_counter)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._history = History(*self._heatmap_key())
        self._policy = FailurePolicy(self.raise_on_error, self.probe_data is not None)
        self._probe = ProbeSource(self.batch_to_inputs_targets, self.probe_size, self.probe_data)
        self._recorder = UpdateRecorder(self._audited, self._audit_failed, self._ledger.clock)
        self._last_step = -1
        self._measurer: Measurer | None = None
        self._measured: nn.Module | None = None
        self._layers: int | None = None  # layers with parameters, once prepared
        self._backend_used: str | None = None
        self._writers = WriterGroup([], self._write_failed)
        self._info: RunInfo | None = None
        self._trainer: pl.Trainer | None = None
        self.last_measurement: Measurement | None = None

    def _heatmap_key(self) -> tuple[str, str]:
        structure = keys.primary_structure(self.settings.structures) or "diag"
        return structure, keys.damping_suffix(
            self.settings.dampings[0], self.settings.several_dampings
        )

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads it around every hook call: formed once per prefix
        cached = self.__dict__.get("_state_key")
        if cached is None or cached[0] != self.log_prefix:
            cached = self._state_key = (
                self.log_prefix,
                self._generate_state_key(log_prefix=self.log_prefix),
            )
        return cached[1]

    # ------------------------------------------------------------------ start

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not trainer.loggers:
            raise MisconfigurationException(
                "Cannot use `FisherMonitor` callback with `Trainer(logger=False)`."
            )

    @override
    @never_raises
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after configure_model() and the move to the device, before the first batch
        self._trainer = trainer
        self._ledger.start()
        timed = self._timed()
        if timed is not None:
            timed.start()
        self._policy = FailurePolicy(self.raise_on_error, self.probe_data is not None)
        self._discovery.reset()
        self._writers = WriterGroup(
            writers_for(trainer.loggers, self.log_prefix, self.log_histograms, self.log_images)
            if trainer.is_global_zero
            else [],
            self._write_failed,
        )
        started = self._ledger.clock()
        self._ledger.dispatch = dispatch_seconds(self, trainer, self._ledger.clock)
        self._prepare_everywhere(pl_module, step=None)
        self._charge(self._ledger.clock() - started, measurement=False, one_time=True)
        self._info = RunInfo(self.log_prefix, self._settings(trainer, pl_module))
        self._write_info()
        if self.audit_optimizer and self.optimizer_index >= len(trainer.optimizers):
            rank_zero_warn(
                f"`FisherMonitor(optimizer_index={self.optimizer_index})`: the trainer has "
                f"{len(trainer.optimizers)} optimizer(s), so the optimizer audit is off. Pass "
                "an index below that, or audit_optimizer=False."
            )
        line = summary.start_line(self._info.settings, self._layers, self.log_prefix)
        rank_zero_info(terminal_safe(line))

    def _prepare_everywhere(self, pl_module: pl.LightningModule, step: int | None) -> bool:
        """Find the network and the loss and prepare the measurer, on every process."""
        error = None
        try:
            self._prepare(pl_module)
        except Exception as exception:  # noqa: BLE001 - the policy decides
            error = exception
        causes = shared_causes(error)
        if any(causes) or error is not None:
            self._measurer = None
            self._policy.handle(causes, step, "prepare", error)
            return False
        return True

    def _prepare(self, pl_module: pl.LightningModule) -> None:
        network = find_network(pl_module, self.network)
        self._layers, self._backend_used = None, None
        if self._discovery.pending:  # the loss is found in the first measured step
            self._measurer, self._measured = None, network
            self._layers = self._discovery.layers(network)
            return
        network, likelihood, outputs = self._discovery.resolve(pl_module, network, self._probe)
        measurer = Measurer(
            network,
            likelihood,
            self.settings,
            backend=self.backend,
            memory_budget=self.memory_budget,
            estimator=self.estimator,
            outputs=outputs,
            solve_budget=self.solve_budget,
        )
        self._probe.prepare()
        if not any(is_lazy(p) for p in network.parameters()):
            prepared = measurer.prepared  # checks the network now, not at the first step
            self._layers, self._backend_used = len(prepared.layers), prepared.backend
        # else: lazy modules get their shapes in the first forward; measure from then on
        self._measurer, self._measured = measurer, network

    def _settings(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        optimizer = self._optimizer(trainer)
        measurer = self._measurer
        return {
            **self.settings.as_dict(),
            "schedule": repr(self.schedule),
            "probe_size": self.probe_size,
            "fixed_probe": self.probe_data is not None,
            "backend": self.backend,
            "backend_used": self._backend_used,
            "estimator": self.estimator,
            "solve_budget": self.solve_budget,
            "network": network_name(pl_module, self._measured) if self._measured else None,
            "loss": loss_text(measurer.likelihood) if measurer else self._discovery.pending_text,
            "optimizer": type(optimizer).__name__ if optimizer is not None else None,
            "audit": optimizer is not None,
            "preconditioner": has_second_moment(optimizer),
            "use": self.use,
            "seed": self.seed,
        }

    # ------------------------------------------------------------------ training

    @override
    @never_raises
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the fit's length for the guaranteed measurements, once the training data loader
        # exists (asking in on_fit_start would load it early, before the module's own
        # on_fit_start) and a checkpoint's state is restored
        expect_steps = getattr(self.schedule, "expect_steps", None)
        if callable(expect_steps):
            expect_steps(_fit_length(trainer))

    @override
    @never_raises
    @charged
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._ledger.step_started()  # the steps a measurement slows down are charged too
        self._ledger.dispatched()
        step = trainer.global_step
        if self._policy.off or step == self._last_step or not self._due(step):
            return
        self._last_step = step
        if self._discovery.pending:  # record this step; measure it before its backward
            if self._measured is not None or self._prepare_everywhere(pl_module, step):
                self._discovery.start(
                    pl_module, self._measured, self.network is not None, batch, step
                )
            return
        started = self._ledger.clock()
        measurement = self._attempt(pl_module, batch, step, started)
        if measurement is not None:
            self._record(trainer, pl_module, measurement, step, started)
        self._charge(self._ledger.clock() - started, measurement=True)
        self._ledger.measured()

    @override
    @never_raises
    @charged
    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:  # noqa: D102
        self._ledger.dispatched()
        self._finish_recording(trainer, pl_module, measure=True)

    # the other hooks Lightning calls at every step: only their dispatch is the monitor's
    @override
    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:  # noqa: D102
        self._ledger.dispatched()

    @override
    def on_after_backward(self, trainer, pl_module) -> None:  # noqa: D102
        self._ledger.dispatched()

    @override
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: D102
        self._ledger.dispatched()

    def _dispatch_probe(self, trainer, pl_module) -> None:
        """A hook that does nothing, to time Lightning's dispatch (:func:`dispatch_seconds`)."""

    @override
    @never_raises
    @charged
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Prepare from a recorded step without backward; charge the step's extra costs.

        What a measurement disturbed, and Lightning's dispatch of the step's hook calls.
        """
        self._ledger.dispatched()
        self._finish_recording(trainer, pl_module, measure=False)  # no backward: next step
        excess = self._ledger.step_finished() + self._ledger.take_dispatch()
        if excess > 0:
            self._charge(excess, measurement=False)

    def _finish_recording(self, trainer, pl_module, measure: bool) -> None:
        """Measure the recorded step before its backward pass (or prepare for the next)."""
        recording = self._discovery.stop()
        if recording is None:
            return
        started, step = self._ledger.clock(), recording.step
        with self._discovery.buffers_at_start(recording):  # as at the step's start
            measurement = (
                self._attempt(pl_module, recording.batch, step, started) if measure else None
            )
        if measurement is not None:
            self._record(trainer, pl_module, measurement, step, started)
        elif not measure:
            self._prepare_everywhere(pl_module, step)
        note = self._discovery.announce(pl_module, self._measured, self._measurer, self._info)
        if note is not None:  # which loss was found and how: a line, a note, the settings
            rank_zero_info(f"FisherMonitor: {note}.")
            self._write_info()
        self._charge(self._ledger.clock() - started, measurement=measure)

    def _due(self, step: int) -> bool:
        decision = bool(self.schedule(step))
        timed = self._timed()
        if timed is not None and timed.decided_on_rank_zero:
            decision = distributed.decision_of_rank_zero(decision)  # the same steps everywhere
        return decision

    def _attempt(
        self, pl_module: pl.LightningModule, batch: Any, step: int, started: float
    ) -> Measurement | None:
        if self._measurer is None and not self._prepare_everywhere(pl_module, step):
            return None
        assert self._measurer is not None
        options = {}
        trainer = self._trainer
        audited = trainer is not None and trainer.is_global_zero and self._optimizer(trainer)
        if audited and measurer_keeps_directions(self._measurer):
            options["keep_directions"] = True  # only rank 0 audits the optimizer's step
        outcome = measure_everywhere(
            self._measurer, lambda: self._probe.take(batch), self._generator, **options
        )
        if outcome.measurement is None:
            self._policy.handle(outcome.causes, step, outcome.stage, outcome.error)
            return None
        outcome.measurement.scalars[keys.probe_key("seconds")] = self._ledger.clock() - started
        self.last_measurement = outcome.measurement
        return outcome.measurement

    # ------------------------------------------------------------------ end

    @override
    @never_raises
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the heat map with every measurement, unless the last one already drew it; one
        # column says nothing the scalars do not (and drawing costs a tenth of a second)
        last = self._history.last()
        if last is None or len(self._history) < 2 or len(self._history) % IMAGE_EVERY == 0:
            return
        started = self._ledger.clock()
        self._writers.call("log_heatmap", self._history, last[0])
        self._charge(self._ledger.clock() - started, measurement=False, one_time=True)

    @override
    @never_raises
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._recorder.disarm()
        if not trainer.is_global_zero or self._info is None:
            return
        log_dirs = [path for path in self._writers.run_directories if Path(path).is_dir()]
        result = summary.FitSummary(
            history=self._history,
            monitor_seconds=self._ledger.spent,
            fit_seconds=self._ledger.elapsed,
            prefix=self.log_prefix,
            log_dirs=log_dirs,
            notes=list(self._info.notes),
            warnings=list(self._policy.warnings),
            off=self._policy.off,
            optimizer=self._info.settings.get("optimizer"),
            verdicts=summary.verdicts_of(
                self._history, self.log_prefix, next(iter(log_dirs), None), self._info.settings
            ),
        )
        self._info.fit = result.as_dict()
        self._write_info()
        # an event writer fails in its thread: surface that now, before the logger's own
        # finalize() would raise it, while a failure is still a warning
        self._writers.call("flush")
        summary.show(result)

    @override
    @never_raises
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:  # noqa: D102
        self._discovery.close()  # a step that failed while recorded leaves no hooks behind

    @override
    @never_raises
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._discovery.close()
        self._recorder.disarm()
        self._trainer = None
        if self._measurer is not None:
            self._measurer.close()
            self._measurer = None

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {
            "last_step": self._last_step,
            "generator_state": self._generator.get_state(),
            "history": self._history.state(),
            "time": self._ledger.state_dict(),
        }
        timed = self._timed()
        if timed is not None:
            state["schedule"] = timed.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict["last_step"])
        self._generator.set_state(state_dict["generator_state"])
        self._history.load(state_dict.get("history", []))
        if "time" in state_dict:
            self._ledger.load_state_dict(state_dict["time"])
        if "schedule" in state_dict and self._timed() is not None:
            self.schedule.load_state_dict(state_dict["schedule"])


def _fit_length(trainer: pl.Trainer) -> int | None:
    """The fit's number of optimizer steps, where Lightning can tell (else ``None``)."""
    try:
        total = trainer.estimated_stepping_batches
    except Exception:  # noqa: BLE001 - e.g. an iterable dataset without a length
        return None
    return int(total) if total is not None and math.isfinite(total) else None
