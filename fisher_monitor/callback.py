"""FisherMonitor: log, every few steps, how far the empirical Fisher is from the Fisher."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks.callback import Callback
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from fisher_monitor import distributed, tensorboard
from fisher_monitor.batching import map_tensors, take_samples
from fisher_monitor.curvature.losses import (
    SUPPORTED_LOSSES,
    LossSpec,
    UnsupportedLossError,
    resolve_loss,
)
from fisher_monitor.curvature.network import is_lazy
from fisher_monitor.engine import BACKENDS, Measurer
from fisher_monitor.measurement import Measurement
from fisher_monitor.metrics import damping_suffix
from fisher_monitor.schedules import Schedule, every
from fisher_monitor.settings import (
    MeasureSettings,
    Structure,
    is_whole_number,
    primary_structure,
)

#: The heat-map image is redrawn at every this many measurements, and at the end of training.
IMAGE_EVERY = 10
#: Default cadence; see the class docstring for how it was chosen.
DEFAULT_EVERY_N_STEPS = 5000

_INPUT_KEYS = ("inputs", "input", "x", "features", "images", "image", "data")
_TARGET_KEYS = ("targets", "target", "y", "labels", "label")

try:  # the same class also serves `lightning.pytorch.Trainer` when that package is installed
    from lightning.pytorch.callbacks.callback import Callback as _LightningCallback

    _BASES: tuple[type, ...] = (Callback, _LightningCallback)
except ImportError:  # pragma: no cover - `lightning` is optional
    _BASES = (Callback,)


def default_batch_to_inputs_targets(batch: Any) -> tuple[Any, Tensor]:
    """Split a training batch into ``(inputs, targets)``.

    Handles ``(inputs, targets, ...)`` tuples and lists, and mappings with one of the keys
    ``inputs``/``input``/``x``/``features``/``images``/``image``/``data`` and one of
    ``targets``/``target``/``y``/``labels``/``label``.

    Args:
        batch: What the dataloader yields.

    Returns:
        ``(inputs, targets)``.

    Raises:
        ValueError: If the batch has none of these forms.
    """
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        inputs = next((batch[k] for k in _INPUT_KEYS if k in batch), None)
        targets = next((batch[k] for k in _TARGET_KEYS if k in batch), None)
        if inputs is not None and targets is not None:
            return inputs, targets
        keys = sorted(map(str, batch))
        raise ValueError(
            f"`FisherMonitor` cannot find inputs and targets in a batch with keys {keys}: it "
            f"looks for one of {_INPUT_KEYS} and one of {_TARGET_KEYS}. Pass "
            "`batch_to_inputs_targets=lambda batch: (inputs, targets)`."
        )
    raise ValueError(
        f"`FisherMonitor` cannot split a batch of type {type(batch).__name__} into "
        "(inputs, targets). Pass `batch_to_inputs_targets=lambda batch: (inputs, targets)`."
    )


def _batch_size(targets: Tensor) -> int:
    return int(targets.shape[0]) if targets.dim() else 0


class FisherMonitor(*_BASES):
    r"""Log how far the empirical Fisher (EF) is from the Fisher (F) as training goes.

    Every few optimizer steps, at ``on_train_batch_start`` (the parameters and the batch
    the optimizer is about to use), the callback measures F and EF of the network on a
    probe batch with :func:`fisher_monitor.measure` (BackPACK, per layer) and logs the
    comparison. It never changes training: the computation runs on a shadow copy of the
    network that shares the parameters' storage, with its own random generator (the
    global RNG state is restored), and leaves ``.grad``, buffers, train/eval modes and
    hooks of your modules untouched.

    Args:
        every_n_steps: Measure every this many optimizer steps (``trainer.global_step``).
            Default 5000: with the default settings (diag + block, exact Fisher) one
            measurement of a 784-512-256-10 MLP on a 128-sample batch, with its
            TensorBoard logging, costs about as much as 60-120 of its Lightning training
            steps on two CPU cores (``make bench``; the spread is the machine's), so every
            5000 steps keeps the amortised overhead under 2%. Measure more often for
            richer curves (every 100 steps costs about 75% there), or use
            ``schedules.log_spaced`` to be dense early and sparse later. Ignored when
            ``schedule`` is given.
        schedule: A callable ``step -> bool`` choosing the steps to measure at, e.g.
            ``schedules.every(50)`` or ``schedules.log_spaced(per_decade=10)``.
        structures: Any of ``"diag"``, ``"block"``, ``"kron"``.
        fisher: ``"exact"`` or ``"mc"`` (sampled labels).
        mc_samples: Sampled labels per input for ``fisher="mc"``.
        damping: λ, or a sequence of values (metrics are then logged per value, ``@λ``).
        damping_mode: ``"relative"`` (λ_b = damping · tr F_b / D_b per layer) or
            ``"absolute"``.
        network: What to measure: ``None`` for the LightningModule itself (or, when it
            defines no ``forward``, the one submodule holding all trainable parameters); an
            attribute name (dotted paths allowed) such as ``"net"``; or a callable taking
            the LightningModule and returning an ``nn.Module``.
        loss_fn: The negative log-likelihood: ``None`` finds the attribute of the
            LightningModule holding a ``CrossEntropyLoss``, ``MSELoss`` or
            ``BCEWithLogitsLoss``; or such a module; or ``"cross_entropy"``, ``"mse"``,
            ``"bce_with_logits"``.
        batch_to_inputs_targets: Callable ``batch -> (inputs, targets)``; ``None`` handles
            ``(inputs, targets, ...)`` tuples/lists and dicts with the usual keys.
        probe_size: Measure on at most this many samples of the batch (per process), the
            first ones; ``None`` for the whole batch.
        probe_data: A fixed probe set used at every measurement instead of the training
            batch, so curves are comparable across steps: a DataLoader (its first batch
            is taken once) or an ``(inputs, targets)`` pair.
        backend: ``"auto"`` (BackPACK where it can handle the network, ``torch.func``
            otherwise, e.g. for LayerNorm or attention), ``"backpack"`` or ``"functorch"``.
            The coverage (which layers, which backend) is logged once as text.
        memory_budget: Peak bytes one measurement may use; ``None`` for half the memory
            available (80% of the free GPU memory). A probe batch estimated to need more is
            sub-sampled, and the measurement's notes say so.
        log_prefix: Prefix of every logged key.
        log_histograms: Log histograms of ``log10(EF_ii / F_ii)`` per layer (TensorBoard).
        log_images: Log a heat map of the direction cosine, layers × steps (TensorBoard).
        prog_bar: Metric key(s), e.g. ``"block/direction_cosine/all"``, to show on the
            progress bar.
        seed: Seed of the monitor's own generator (label sampling, dropout masks).
        raise_on_error: Raise instead of warning when a measurement fails.

    Logged keys (``{prefix}`` is ``log_prefix``), at ``trainer.global_step``, through
    ``trainer.loggers`` (rank zero only):

    - ``{prefix}/{structure}/{metric}/{layer}`` and ``{prefix}/{structure}/{metric}/all``
      for every metric of DESIGN.md §3: ``trace_ratio``, ``rel_error``, ``matrix_cosine``,
      ``kl``, ``direction_cosine``, ``nat_grad_cosine``, ``ef_grad_cosine``,
      ``nat_projection``, ``ef_projection``, ``ef_projection_per_sample``, ``dimension``,
      ``damping`` (damped ones as ``{metric}@{λ}`` with several dampings);
    - ``{prefix}/probe/loss``, ``{prefix}/probe/batch_size``, ``{prefix}/probe/grad_norm``,
      ``{prefix}/probe/seconds``.

    A value that is not a number (a ratio with a zero denominator, e.g. the trace ratio of
    a layer whose Fisher vanishes) is not logged.

    With a ``TensorBoardLogger`` also: a Custom Scalars layout, histograms
    ``{prefix}/histograms/log10_ef_over_f/{layer}``, the image
    ``{prefix}/images/direction_cosine`` (the heat map of every measurement so far, drawn
    at the 1st, 11th, 21st, … measurement and at the end of training), and the settings
    and coverage as text ``{prefix}/settings``.

    Distributed data parallel: with ``structures=("diag",)`` every process measures its
    own probe batch and the diagonals are summed over processes before any ratio, so the
    result equals a single process on the joined batch. With ``"block"`` or ``"kron"``
    the probe batches are gathered and every process measures the joined batch (exact,
    identical everywhere; costs as much as a single process on the joined batch).

    Raises:
        MisconfigurationException: At setup, with ``Trainer(logger=False)``.
        ValueError: At construction, for invalid arguments; at the start of fitting (after
            ``configure_model``), when no loss or network is found; at the first batch,
            when the batch cannot be split into inputs and targets.
        NotImplementedError: At the start of fitting, for a network the chosen backend
            cannot handle (with ``backend="auto"`` only when ``torch.func`` cannot either).

    Example::

        >>> from pytorch_lightning import Trainer
        >>> from fisher_monitor import FisherMonitor
        >>> trainer = Trainer(callbacks=[FisherMonitor(every_n_steps=50)])
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
        probe_size: int | None = None,
        probe_data: Any = None,
        backend: str = "auto",
        memory_budget: int | None = None,
        log_prefix: str = "fisher",
        log_histograms: bool = True,
        log_images: bool = True,
        prog_bar: str | Sequence[str] | None = None,
        seed: int = 0,
        raise_on_error: bool = False,
    ) -> None:
        self.settings = MeasureSettings.create(
            structures, fisher, mc_samples, damping, damping_mode
        )
        #: The structure whose direction cosines the heat map shows.
        self._heatmap_structure = primary_structure(self.settings.structures).value
        if every_n_steps is not None and schedule is not None:
            raise ValueError(
                "Pass either `every_n_steps` or `schedule` to `FisherMonitor`, not both."
            )
        if schedule is not None and not callable(schedule):
            raise ValueError(f"Invalid schedule: {schedule!r}. Pass a callable step -> bool.")
        self.schedule: Schedule = (
            schedule if schedule is not None else every(every_n_steps or DEFAULT_EVERY_N_STEPS)
        )
        if network is not None and not (isinstance(network, str) or callable(network)):
            raise ValueError(
                f"Invalid network: {network!r}. Pass None, an attribute name or a callable."
            )
        if loss_fn is not None:
            resolve_loss(loss_fn)  # fail early on unsupported losses
        if probe_size is not None and not is_whole_number(probe_size):
            raise ValueError(f"Invalid probe_size: {probe_size!r}. Use a positive integer or None.")
        if not isinstance(log_prefix, str):
            raise ValueError(f"Invalid log_prefix: {log_prefix!r}. Use a string.")
        if batch_to_inputs_targets is not None and not callable(batch_to_inputs_targets):
            raise ValueError(f"Invalid batch_to_inputs_targets: {batch_to_inputs_targets!r}.")
        self.network = network
        self.loss_fn = loss_fn
        self.batch_to_inputs_targets = batch_to_inputs_targets or default_batch_to_inputs_targets
        self.probe_size = probe_size
        self.probe_data = probe_data
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}. Supported: {BACKENDS}.")
        self.backend = backend
        self.memory_budget = memory_budget
        self.log_prefix = log_prefix.rstrip("/")
        self.log_histograms = log_histograms
        self.log_images = log_images
        self.prog_bar = [prog_bar] if isinstance(prog_bar, str) else list(prog_bar or [])
        self.seed = seed
        self.raise_on_error = raise_on_error

        self._generator = torch.Generator().manual_seed(seed)
        self._last_step = -1
        self._history: list[tuple[int, dict[str, float]]] = []
        self._measurer: Measurer | None = None
        self._probe: tuple[Any, Tensor] | None = None
        self._checked_batch = False
        self._layout_written = False
        self._warned: set[str] = set()
        self.last_measurement: Measurement | None = None

    # ------------------------------------------------------------------ setup

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(log_prefix=self.log_prefix)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers:
            raise MisconfigurationException(
                "Cannot use `FisherMonitor` callback with `Trainer(logger=False)`."
            )
        self._checked_batch = False

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after configure_model() and the move to the device, before the first batch
        self._prepare(pl_module)

    def _prepare(self, pl_module: pl.LightningModule) -> None:
        network = self._resolve_network(pl_module)
        loss = self._resolve_loss(pl_module)
        self._measurer = Measurer(
            network, loss, self.settings, backend=self.backend, memory_budget=self.memory_budget
        )
        if not any(is_lazy(p) for p in network.parameters()):
            self._measurer.prepared  # noqa: B018 - checks the network now, not at the first step
        # else: lazy modules get their shapes in the first forward; measure from then on
        if self.probe_data is not None:
            self._probe = self._fixed_probe(self.probe_data)

    def _resolve_network(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.network is None:
            if _overrides_forward(pl_module):
                return pl_module
            # no forward(): measure the one submodule that holds every trainable parameter
            trainable = {id(p) for p in pl_module.parameters() if p.requires_grad}
            holders = [
                (name, child)
                for name, child in pl_module.named_children()
                if trainable and {id(p) for p in child.parameters() if p.requires_grad} == trainable
            ]
            if len(holders) == 1:
                return holders[0][1]
            raise ValueError(
                f"`FisherMonitor` cannot measure {type(pl_module).__name__}: it defines no "
                "forward() and no single submodule holds all its trainable parameters. Pass "
                "`network='<attribute>'` or `network=lambda module: ...`."
            )
        if isinstance(self.network, str):
            target: Any = pl_module
            for part in self.network.split("."):
                if not hasattr(target, part):
                    raise ValueError(
                        f"`FisherMonitor(network={self.network!r})`: "
                        f"{type(pl_module).__name__} has no attribute {part!r}."
                    )
                target = getattr(target, part)
        else:
            target = self.network(pl_module)
        if not isinstance(target, nn.Module):
            raise ValueError(
                f"`FisherMonitor(network={self.network!r})` gave a {type(target).__name__}, "
                "not an nn.Module."
            )
        return target

    def _resolve_loss(self, pl_module: pl.LightningModule) -> LossSpec:
        if self.loss_fn is not None:
            return resolve_loss(self.loss_fn)
        found: dict[str, nn.Module] = {}
        candidates = {**vars(pl_module), **dict(pl_module.named_children())}
        for name, value in candidates.items():
            if isinstance(value, nn.Module) and type(value).__name__ in SUPPORTED_LOSSES:
                found[name] = value
        if len(found) == 1:
            ((name, module),) = found.items()
            try:
                return resolve_loss(module)
            except UnsupportedLossError as error:
                raise ValueError(
                    f"`FisherMonitor` found the loss `{name}` on {type(pl_module).__name__} "
                    f"but cannot use it: {error}"
                ) from None
        if len(found) > 1:
            raise ValueError(
                f"`FisherMonitor` found several losses on {type(pl_module).__name__} "
                f"({sorted(found)}). Pass the negative log-likelihood to monitor as `loss_fn=`."
            )
        raise ValueError(
            f"`FisherMonitor` found no loss module on {type(pl_module).__name__}: it looks for "
            "an attribute holding a CrossEntropyLoss, MSELoss or BCEWithLogitsLoss. Pass "
            "`loss_fn=nn.CrossEntropyLoss()` (or 'cross_entropy', 'mse', 'bce_with_logits')."
        )

    def _fixed_probe(self, probe_data: Any) -> tuple[Any, Tensor]:
        if isinstance(probe_data, torch.utils.data.DataLoader):
            with torch.random.fork_rng(devices=[]):  # a shuffling sampler draws a seed
                batch = next(iter(probe_data))
            inputs, targets = self.batch_to_inputs_targets(batch)
        elif isinstance(probe_data, (tuple, list)) and len(probe_data) == 2:
            inputs, targets = probe_data
        else:
            raise ValueError(
                f"Invalid probe_data: {type(probe_data).__name__}. Pass a DataLoader or an "
                "(inputs, targets) pair."
            )
        if distributed.is_distributed():  # each process takes its share of the probe set
            world, rank = torch.distributed.get_world_size(), distributed.rank()
            inputs = map_tensors(inputs, lambda t: t[rank::world])
            targets = targets[rank::world]
        return inputs, targets

    # ------------------------------------------------------------------ training

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._checked_batch and self._probe is None:
            self.batch_to_inputs_targets(batch)  # a clear error now rather than at step N
            self._checked_batch = True
        step = trainer.global_step
        if step == self._last_step or not self.schedule(step):
            return
        self._last_step = step
        self._measure_and_log(trainer, pl_module, batch, step)

    def _probe_batch(self, batch: Any) -> tuple[Any, Tensor]:
        if self._probe is not None:
            inputs, targets = self._probe
        else:
            inputs, targets = self.batch_to_inputs_targets(batch)
        if not isinstance(targets, Tensor):
            raise ValueError(
                f"`FisherMonitor` needs the targets as a tensor, got {type(targets).__name__}."
            )
        if self.probe_size is not None and _batch_size(targets) > self.probe_size:
            inputs = take_samples(inputs, self.probe_size)
            targets = targets[: self.probe_size]
        return inputs, targets

    def _measure_and_log(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, step: int
    ) -> None:
        if self._measurer is None:  # a loop that skipped on_fit_start
            self._prepare(pl_module)
        assert self._measurer is not None
        start = time.perf_counter()
        problem = None
        try:
            inputs, targets = self._probe_batch(batch)
        except Exception as error:  # noqa: BLE001 - reported below, training goes on
            problem = error
        if not distributed.all_agree(problem is None):
            if problem is not None:
                self._fail(step, problem)
            return
        try:
            measurement = self._measure(inputs, targets)
        except Exception as error:  # noqa: BLE001
            self._fail(step, error)
            return
        measurement.scalars["probe/seconds"] = time.perf_counter() - start
        self.last_measurement = measurement
        self._log(trainer, pl_module, measurement, step)

    def _measure(self, inputs: Any, targets: Tensor) -> Measurement:
        assert self._measurer is not None
        if not distributed.is_distributed():
            return self._measurer(inputs, targets, generator=self._generator)
        if self.settings.structures == (Structure.DIAG,):
            return self._measure_diagonal_distributed(inputs, targets)
        joined_inputs = map_tensors(inputs, distributed.gather_batch)
        joined_targets = distributed.gather_batch(targets)
        return self._measurer(joined_inputs, joined_targets, generator=self._generator)

    def _measure_diagonal_distributed(self, inputs: Any, targets: Tensor) -> Measurement:
        """Local pass per process, diagonals summed across processes before any ratio."""
        assert self._measurer is not None
        # independent labels per process: fold the rank into this measurement's seed
        seed = int(torch.randint(0, 2**62, (1,), generator=self._generator))
        generator = torch.Generator().manual_seed(seed + distributed.rank())
        agreed = []

        def all_reduce(flat: Tensor) -> Tensor:
            agreed.append(True)
            if not distributed.all_agree(True):
                raise RuntimeError("another process failed its part of this measurement")
            return distributed.all_reduce_sum(flat)

        try:
            return self._measurer(inputs, targets, generator=generator, all_reduce=all_reduce)
        except Exception:
            if not agreed:  # the others wait in `all_agree`: tell them to give up too
                distributed.all_agree(False)
            raise

    def _fail(self, step: int, error: BaseException) -> None:
        if self.raise_on_error:
            raise error
        if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        reason = f"{type(error).__name__}: {error}"
        if reason not in self._warned:
            self._warned.add(reason)
            rank_zero_warn(
                f"`FisherMonitor` skipped the measurement at step {step} ({reason}). Training "
                "continues; later measurements failing for the same reason are skipped silently."
            )

    # ------------------------------------------------------------------ logging

    def _log(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        measurement: Measurement,
        step: int,
    ) -> None:
        prefix = self.log_prefix
        metrics = {
            f"{prefix}/{key}": value
            for key, value in measurement.scalars.items()
            if not math.isnan(value)
        }
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        for key in self.prog_bar:
            if key in measurement.scalars:
                pl_module.log(
                    f"{prefix}/{key}",
                    measurement.scalars[key],
                    prog_bar=True,
                    logger=False,
                    on_step=True,
                    on_epoch=False,
                )
        self._history.append((step, self._heatmap_values(measurement)))
        if not trainer.is_global_zero:
            return
        writers = tensorboard.tensorboard_writers(trainer.loggers)
        for writer in writers:
            if not self._layout_written:
                writer.add_custom_scalars(
                    tensorboard.custom_scalar_layout(
                        prefix, [s.value for s in self.settings.structures], self.settings.dampings
                    )
                )
                settings = {
                    **self.settings.as_dict(),
                    "schedule": repr(self.schedule),
                    "probe_size": self.probe_size,
                    "fixed probe": self._probe is not None,
                }
                writer.add_text(
                    f"{prefix}/settings",
                    tensorboard.settings_markdown(
                        settings, measurement.coverage, measurement.notes
                    ),
                    step,
                )
            if self.log_histograms:
                tensorboard.log_histograms(writer, prefix, measurement.diagonals, step)
            if self.log_images and len(self._history) % IMAGE_EVERY == 1:
                self._log_image(writer, step)
        self._layout_written = self._layout_written or bool(writers)

    def _log_image(self, writer, step: int) -> None:
        steps, layers, values, title = self._heatmap()
        image = tensorboard.heatmap_image(steps, layers, values, title)
        writer.add_image(
            f"{self.log_prefix}/images/direction_cosine", image, step, dataformats="HWC"
        )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the heat map with every measurement, unless the last one already drew it
        if self.log_images and self._history and len(self._history) % IMAGE_EVERY != 1:
            if trainer.is_global_zero:
                for writer in tensorboard.tensorboard_writers(trainer.loggers):
                    self._log_image(writer, self._history[-1][0])

    def _heatmap_values(self, measurement: Measurement) -> dict[str, float]:
        structure = self._heatmap_structure
        suffix = damping_suffix(self.settings.dampings[0], self.settings.several_dampings)
        values = {}
        for name in [*measurement.layer_names, "all"]:
            key = f"{structure}/direction_cosine{suffix}/{name}"
            if key in measurement.scalars:
                values[name] = measurement.scalars[key]
        return values

    def _heatmap(self) -> tuple[list[int], list[str], np.ndarray, str]:
        steps = [step for step, _ in self._history]
        layers: list[str] = []
        for _, values in self._history:
            layers += [name for name in values if name not in layers]
        grid = np.full((len(layers), len(steps)), np.nan)
        for j, (_, values) in enumerate(self._history):
            for i, name in enumerate(layers):
                grid[i, j] = values.get(name, np.nan)
        title = f"{self._heatmap_structure}: cos(natural gradient, EF direction)"
        return steps, layers, grid, title

    # ------------------------------------------------------------------ lifecycle

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._measurer is not None:
            self._measurer.close()
            self._measurer = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self._last_step,
            "generator_state": self._generator.get_state(),
            "history": list(self._history),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict["last_step"])
        self._generator.set_state(state_dict["generator_state"])
        self._history = [(int(s), dict(v)) for s, v in state_dict.get("history", [])]


def _overrides_forward(module: nn.Module) -> bool:
    """Whether a LightningModule subclass defines its own ``forward``."""
    base_forwards = set()
    for namespace in ("pytorch_lightning", "lightning.pytorch"):
        try:
            base = __import__(namespace, fromlist=["LightningModule"]).LightningModule
        except ImportError:  # pragma: no cover
            continue
        base_forwards.add(base.forward)
    return type(module).forward not in base_forwards
