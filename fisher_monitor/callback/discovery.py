"""Which network and which loss the monitor measures, and how its probe is taken.

Unless ``loss_fn=`` and ``batch_to_inputs_targets=`` (or a fixed ``probe_data`` pair) say
it all, the monitor records the first training step it measures
(:mod:`~fisher_monitor.callback.recording`) and derives from it how to turn any later
batch into the probe (:mod:`~fisher_monitor.callback.derivation`): the loss function and
its options, the network's call, the loss's input and the targets. That step is measured
right before its backward pass, on the same parameters and batch as any other step.
Without a loss call in the step, a loss module held by the LightningModule is used, as
before recording existed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning
import torch
from torch import nn

from fisher_monitor.callback.batches import ProbeSource, default_batch_to_inputs_targets
from fisher_monitor.callback.derivation import SUPPORTED_TEXT, NoLossSeen, derive
from fisher_monitor.callback.recipe import Recipe, RecipeError
from fisher_monitor.callback.recording import Recording, StepRecorder, buffers_at_start
from fisher_monitor.layers import find_layers, is_lazy
from fisher_monitor.likelihoods import (
    SUPPORTED_LOSSES,
    Likelihood,
    UnsupportedLossError,
    resolve_loss,
)

#: ``LightningModule.forward`` of both namespaces (``lightning.pytorch`` where installed).
_LIGHTNING_FORWARDS = {pytorch_lightning.LightningModule.forward}
try:
    import lightning.pytorch

    _LIGHTNING_FORWARDS.add(lightning.pytorch.LightningModule.forward)
except ImportError:  # pragma: no cover - the lightning package is optional
    pass

#: What to pass when the loss or the probe cannot be found.
DISCOVERY_FIX = (
    "Tell it what to measure: `batch_to_inputs_targets=lambda batch: (inputs, targets)` "
    "(the network's inputs, and the targets per sample, e.g. (N, T) token labels), "
    "`loss_fn=` (the negative log-likelihood, e.g. nn.CrossEntropyLoss()) and, when the "
    "loss's input is not the network's output, `outputs=lambda out: ...` (per sample, "
    "classes on dimension 1, e.g. `lambda out: out.logits[:, :-1].transpose(1, 2)`)."
)

NetworkArgument = str | Callable[[Any], nn.Module] | None


def find_network(pl_module: nn.Module, network: NetworkArgument) -> nn.Module:
    """The network to measure.

    Args:
        pl_module: The LightningModule.
        network: ``None`` for the module itself (or, when it defines no ``forward``, the one
            submodule holding all trainable parameters), an attribute name (dotted paths
            allowed), or a callable ``module -> nn.Module``.

    Returns:
        The network.

    Raises:
        ValueError: When nothing fitting is found; the message says what to pass.
    """
    if network is None:
        return _default_network(pl_module)
    if isinstance(network, str):
        target: Any = pl_module
        for part in network.split("."):
            if not hasattr(target, part):
                raise ValueError(
                    f"`FisherMonitor(network={network!r})`: "
                    f"{type(pl_module).__name__} has no attribute {part!r}."
                )
            target = getattr(target, part)
    else:
        target = network(pl_module)
    if not isinstance(target, nn.Module):
        raise ValueError(
            f"`FisherMonitor(network={network!r})` gave a {type(target).__name__}, "
            "not an nn.Module."
        )
    return target


def _default_network(pl_module: nn.Module) -> nn.Module:
    if overrides_forward(pl_module):
        return pl_module
    # no forward(): measure the one submodule that holds every trainable parameter
    trainable = {id(p) for p in pl_module.parameters() if p.requires_grad}
    holders = [
        child
        for _, child in pl_module.named_children()
        if trainable and {id(p) for p in child.parameters() if p.requires_grad} == trainable
    ]
    if len(holders) == 1:
        return holders[0]
    raise ValueError(
        f"`FisherMonitor` cannot measure {type(pl_module).__name__}: it defines no "
        "forward() and no single submodule holds all its trainable parameters. Pass "
        "`network='<attribute>'` or `network=lambda module: ...`."
    )


def find_loss(pl_module: nn.Module, loss_fn: nn.Module | str | None) -> Likelihood:
    """The negative log-likelihood to measure.

    Args:
        pl_module: The LightningModule.
        loss_fn: A supported loss module or name, or ``None`` to find the one attribute of
            ``pl_module`` holding a supported loss module.

    Returns:
        The validated loss.

    Raises:
        ValueError: When no loss, several, or an unsupported one is found.
    """
    if loss_fn is not None:
        return resolve_loss(loss_fn)
    candidates = {**vars(pl_module), **dict(pl_module.named_children())}
    found = {
        name: value
        for name, value in candidates.items()
        if isinstance(value, nn.Module) and type(value).__name__ in SUPPORTED_LOSSES
    }
    owner = type(pl_module).__name__
    if len(found) == 1:
        ((name, module),) = found.items()
        try:
            return resolve_loss(module)
        except UnsupportedLossError as error:
            raise ValueError(
                f"`FisherMonitor` found the loss `{name}` on {owner} but cannot use it: {error}"
            ) from None
    if len(found) > 1:
        raise ValueError(
            f"`FisherMonitor` found several losses on {owner} ({sorted(found)}). Pass the "
            "negative log-likelihood to monitor as `loss_fn=`."
        )
    raise ValueError(
        f"`FisherMonitor` found no loss module on {owner}: it looks for a loss function "
        f"called in training_step ({SUPPORTED_TEXT}) and for an attribute holding a "
        "CrossEntropyLoss, NLLLoss, MSELoss or BCEWithLogitsLoss. Pass "
        "`loss_fn=nn.CrossEntropyLoss()` (or 'cross_entropy', 'nll', 'mse', "
        "'bce_with_logits')."
    )


class LossDiscovery:
    """Finds the loss and the probe recipe by recording one training step.

    Args:
        loss_fn: The user's ``loss_fn=`` (``None``: found).
        splitter_given: Whether ``batch_to_inputs_targets=`` was given.
        probe_data: The user's ``probe_data=``.
        outputs: The user's ``outputs=``.
    """

    def __init__(
        self,
        loss_fn: nn.Module | str | None,
        splitter_given: bool,
        probe_data: Any,
        outputs: Callable[[Any], Any] | None,
    ) -> None:
        fixed_pair = probe_data is not None and not isinstance(
            probe_data, torch.utils.data.DataLoader
        )
        self.loss_fn = loss_fn
        self.outputs = outputs
        self.need_batch = not splitter_given and not fixed_pair
        #: Whether anything is left to find by recording a step.
        self.wanted = loss_fn is None or self.need_batch
        self._recorder = StepRecorder()
        self.reset()

    def reset(self) -> None:
        """Forget what was found (a new fit records again)."""
        self._recorder.stop()
        self.recorded_at: int | None = None
        self._recording: Recording | None = None
        self._found: tuple[Recipe, Likelihood] | None = None
        self._error: ValueError | None = None
        self.fallback_reason: str | None = None

    @property
    def pending(self) -> bool:
        """Whether a step must still be recorded before measuring."""
        return self.wanted and self.recorded_at is None

    @property
    def recording(self) -> bool:
        """Whether a step is being recorded now."""
        return self._recorder.active

    @property
    def pending_text(self) -> str | None:
        """The loss for the start line while it is not found yet."""
        if not self.pending:
            return None
        return "the loss training_step computes (found at the first measured step)"

    def note(self, owner: str) -> str | None:
        """Which loss was found at the recorded step and how (``None``: nothing to say)."""
        if self.recorded_at is None or self._error is not None:
            return None
        if self._found is not None:
            return found_note(owner, *self._found, self.recorded_at)
        if self.fallback_reason is not None:
            return fallback_note(owner, self.fallback_reason)
        return None

    def announce(
        self, pl_module: nn.Module, network: nn.Module | None, measurer: Any, info: Any
    ) -> str | None:
        """The note of :meth:`note`, also put into the run information ``info``.

        It joins the notes, and the settings' loss and network become those measured;
        ``None`` when nothing was found.
        """
        note = self.note(type(pl_module).__name__) if measurer is not None else None
        if note is None or info is None:
            return None
        info.settings["loss"] = loss_text(measurer.likelihood)
        if network is not None:
            info.settings["network"] = network_name(pl_module, network)
        info.add_notes([note])
        return note

    def start(
        self, pl_module: nn.Module, network: nn.Module, explicit: bool, batch: Any, step: int
    ):
        """Record the step that starts now (hooks on the candidate networks, the loss spy).

        Args:
            pl_module: The LightningModule.
            network: The network the monitor would measure.
            explicit: Whether the user named it (``network=``): then only it is watched.
            batch: The step's batch.
            step: ``trainer.global_step``.
        """
        modules = watched_modules(pl_module, network, explicit)
        self._recorder.start(modules, batch, step, owner=pl_module)

    def stop(self) -> Recording | None:
        """Stop recording (idempotent); the recording, once."""
        recording = self._recorder.stop()
        if recording is not None:
            self._recording, self.recorded_at = recording, recording.step
        return recording

    def buffers_at_start(self, recording: Recording):
        """A context in which the modules hold the buffers of the recorded step's start."""
        return buffers_at_start(recording)

    @staticmethod
    def layers(network: nn.Module) -> int | None:
        """The number of layers the network has (``None`` before lazy modules have shapes)."""
        if any(is_lazy(p) for p in network.parameters()):
            return None
        return len(find_layers(network))

    def found(self, pl_module: nn.Module, network: nn.Module) -> tuple[Recipe, Likelihood] | None:
        """The recipe and likelihood derived from the recorded step.

        ``None``: use the loss module attribute and the default split (no loss call was
        seen, or the loss could not be rebuilt and the module has a loss attribute).

        Raises:
            ValueError: When the step's loss cannot be measured (the message says why and
                what to pass).
        """
        recording, self._recording = self._recording, None
        if recording is not None:
            self._derive(pl_module, network, recording)
        if self._error is not None:
            raise self._error
        return self._found

    def resolve(
        self, pl_module: nn.Module, network: nn.Module, probe: ProbeSource
    ) -> tuple[nn.Module, Likelihood, Callable[[Any], Any] | None]:
        """The network, likelihood and ``outputs=`` to measure; sets the probe's split.

        Raises:
            ValueError: When the loss cannot be found or measured (the message says why
                and what to pass).
        """
        found = self.found(pl_module, network)
        if found is None:
            likelihood = find_loss(pl_module, self.loss_fn)
            if self.need_batch:  # as without recording (a recipe of an earlier fit goes)
                probe.splitter = default_batch_to_inputs_targets
            probe.likelihood = likelihood
            return network, likelihood, self.outputs
        recipe, likelihood = found
        if self.need_batch:
            probe.splitter = recipe.split
        probe.likelihood = likelihood
        return recipe.network, likelihood, self.outputs or recipe.outputs

    def _derive(self, pl_module: nn.Module, network: nn.Module, recording: Recording) -> None:
        given = resolve_loss(self.loss_fn) if self.loss_fn is not None else None
        held = [type(getattr(pl_module, name)) for name in _loss_attributes(pl_module)]
        prefer = held[0] if len(held) == 1 else None
        try:
            self._found = derive(recording, network, self.outputs, self.need_batch, given, prefer)
        except NoLossSeen:
            self._found = None
        except RecipeError as error:
            owner = type(pl_module).__name__
            if _loss_attributes(pl_module) and self.loss_fn is None:
                self.fallback_reason = str(error)  # as before recording: the attribute
                return
            self._error = ValueError(
                f"`FisherMonitor` recorded {owner}.training_step at step {recording.step} but "
                f"cannot measure its loss: {error}. {DISCOVERY_FIX}"
            )

    def close(self) -> None:
        """Remove the recording's hooks, if a step was being recorded."""
        self._recorder.stop()


def watched_modules(
    pl_module: nn.Module, network: nn.Module, explicit: bool
) -> dict[str, nn.Module]:
    """The modules whose calls are recorded.

    The network and, when the monitor chose it (no ``network=``), the LightningModule's
    children holding trainable parameters.
    """
    names = {id(module): name for name, module in pl_module.named_modules()}
    watched = {names.get(id(network), ""): network}
    if not explicit and network is pl_module:
        for name, child in pl_module.named_children():
            if any(p.requires_grad for p in child.parameters()):
                watched[name] = child
    return watched


def _loss_attributes(pl_module: nn.Module) -> list[str]:
    candidates = {**vars(pl_module), **dict(pl_module.named_children())}
    return [
        name
        for name, value in candidates.items()
        if isinstance(value, nn.Module) and type(value).__name__ in SUPPORTED_LOSSES
    ]


def loss_text(likelihood: Any) -> str:
    """``CrossEntropyLoss(reduction='mean', ignore_index=-100)``: the loss as measured."""
    module = getattr(likelihood, "module_class", None)
    name = module.__name__ if module is not None else type(likelihood).__name__
    options = getattr(likelihood, "options", dict)()
    listed = "".join(f", {key}={value!r}" for key, value in options.items())
    return f"{name}(reduction={getattr(likelihood, 'reduction', 'mean')!r}{listed})"


def overrides_forward(module: nn.Module) -> bool:
    """Whether a LightningModule subclass defines its own ``forward``."""
    return type(module).forward not in _LIGHTNING_FORWARDS


def network_name(pl_module: nn.Module, network: nn.Module) -> str:
    """A readable name, e.g. ``"TinyClassifier.net (Sequential)"`` or ``"TinyClassifier"``."""
    owner = type(pl_module).__name__
    if network is pl_module:
        return owner
    path = next((name for name, m in pl_module.named_modules() if m is network and name), None)
    kind = type(network).__name__
    return f"{owner}.{path} ({kind})" if path else kind


def found_note(owner: str, recipe: Recipe, likelihood: Likelihood, step: int) -> str:
    """The note that says which loss was found and how the probe is taken."""
    if recipe.nested:
        where = f"in {type(recipe.network).__name__}.forward (called by training_step)"
    else:
        where = "in training_step"
    text = f"loss found {where} at step {step}: {recipe.loss_text} on {recipe.output.text()}"
    if recipe.reading is not None:
        text += f" ({recipe.reading})"
    if recipe.targets is not None:
        text += f", targets {recipe.targets.text()}; the probe calls {recipe.call_text(owner)}"
    if recipe.dropped:
        text += f" without {', '.join(f'{name}=' for name in recipe.dropped)} (the labels)"
    return text + f"; measured as {likelihood!r}"


def fallback_note(owner: str, reason: str) -> str:
    """The note of a loss module attribute used because the recorded loss was not rebuilt."""
    return (
        f"the loss of {owner}.training_step could not be rebuilt from the recorded step "
        f"({reason}); measuring {owner}'s loss module on the network's output with the batch "
        "split as (inputs, targets) instead: pass `batch_to_inputs_targets=` and `outputs=` "
        "if that is not what training_step computes"
    )
