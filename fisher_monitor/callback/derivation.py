"""From a recorded training step to the :class:`~fisher_monitor.callback.recipe.Recipe`.

The loss calls of the step are tried in turn (training losses before logged metrics, losses
computed in ``training_step`` before those a network computes in its own ``forward``); for
each, the watched network calls (the measured network first) and the tensors of their
outputs, the readings of :mod:`~fisher_monitor.callback.recipe`, until one reproduces the
loss's recorded input and targets exactly and its network call can be rebuilt from the
batch. What could not be matched is kept, to name it when nothing matches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor, nn

from fisher_monitor.callback.recipe import (
    OutputReading,
    Recipe,
    RecipeError,
    TargetReading,
    argument_readings,
    class_readings,
    elementwise_readings,
    output_candidates,
    rows,
    target_readings,
    target_sources,
)
from fisher_monitor.callback.recording import (
    SUPPORTED_FUNCTIONS,
    LossCall,
    NetworkCall,
    Recording,
    fetch,
)
from fisher_monitor.likelihoods import (
    FUNCTIONAL_LOSSES,
    Likelihood,
    UnsupportedLossError,
    functional_loss_module,
    resolve_loss,
)

#: Losses on class labels (the input's dimension 1 holds the classes).
_CLASS_FUNCTIONS = ("cross_entropy", "nll_loss")
#: The activation a loss's input may have gone through, recognised and measured on the
#: logits: ``log_softmax`` before ``F.nll_loss``, ``sigmoid`` before ``F.binary_cross_entropy``.
_ACTIVATIONS: dict[str, tuple[str | None, ...]] = {
    "nll_loss": (None, "log_softmax"),
    "binary_cross_entropy": ("sigmoid",),
}
#: Supported loss functions, as users write them.
SUPPORTED_TEXT = ", ".join(f"F.{name}" for name in SUPPORTED_FUNCTIONS)


class NoLossSeen(RecipeError):
    """The recorded step called no loss function at all."""


def derive(
    recording: Recording,
    preferred: nn.Module,
    outputs: Callable[[Any], Any] | None = None,
    need_targets: bool = True,
    likelihood: Likelihood | None = None,
    prefer: type[nn.Module] | None = None,
) -> tuple[Recipe, Likelihood]:
    """The recipe and the likelihood of the loss ``training_step`` computed.

    Args:
        recording: The recorded step.
        preferred: The network the monitor would measure (tried first).
        outputs: The user's ``outputs=`` (the loss's input from the network's output),
            checked against the recording instead of derived.
        need_targets: Derive the targets and the network's call (no ``batch_to_inputs_
            targets=`` was given).
        likelihood: The user's ``loss_fn=`` (replaces the recorded loss's options).
        prefer: The class of the loss module the LightningModule holds, if one: among
            several losses, the one of this class is the likelihood.

    Raises:
        NoLossSeen: When no loss function was called.
        RecipeError: With what was seen and why it cannot be measured.
    """
    if recording.error is not None:
        raise RecipeError(f"recording the step failed ({recording.error})")
    if not recording.losses:
        raise NoLossSeen("training_step called no loss function of torch.nn.functional")
    supported = [call for call in recording.losses if call.function in SUPPORTED_FUNCTIONS]
    if not supported:
        raise RecipeError(
            f"training_step computes {recording.losses[0].text()}, which is not a negative "
            f"log-likelihood fisher-monitor supports ({SUPPORTED_TEXT}, or their modules)"
        )
    supported.sort(key=lambda call: (not call.training, bool(call.inside)))
    found, reasons = [], []
    for call in supported:
        try:
            found.append(_derive_one(recording, call, preferred, outputs, need_targets, likelihood))
        except RecipeError as error:
            reasons.append(f"{call.text()}: {error}" if len(supported) > 1 else str(error))
    if not found:
        raise RecipeError("; ".join(dict.fromkeys(reasons)))
    wanted = likelihood.module_class if likelihood is not None else prefer
    matching = [item for item in found if item[0].loss_module is wanted]
    first = (matching or found)[0]
    different = [
        recipe
        for recipe, _ in found
        if recipe.loss_module is not first[0].loss_module and _is_training(recording, recipe)
    ]
    if different and not matching:
        texts = sorted({first[0].loss_text, *(recipe.loss_text for recipe in different)})
        raise RecipeError(
            f"training_step computes several losses ({', '.join(texts)}); pass the negative "
            "log-likelihood to monitor as `loss_fn=` (auxiliary losses are not part of it)"
        )
    return first


def _is_training(recording: Recording, recipe: Recipe) -> bool:
    return any(call.training and call.text() == recipe.loss_text for call in recording.losses)


def _derive_one(
    recording: Recording,
    loss: LossCall,
    preferred: nn.Module,
    outputs: Callable[[Any], Any] | None,
    need_targets: bool,
    given: Likelihood | None,
) -> tuple[Recipe, Likelihood]:
    options = _options(loss)
    if not isinstance(loss.input, Tensor) or not isinstance(loss.target, Tensor):
        raise RecipeError(f"{loss.text()} was not called with tensors")
    activations = _ACTIVATIONS.get(loss.function, (None,))
    _likelihood(loss, options, activations[0], given)  # refuse what is no likelihood first
    misses: list[str] = []
    for call in _calls(recording, preferred):
        for activation in activations:
            for reading, candidate in _readings(call, loss, activation, outputs):
                likelihood, how = _likelihood(loss, options, activation, given)
                try:
                    recipe = _recipe(recording, call, loss, reading, candidate, need_targets)
                except RecipeError as error:
                    misses.append(str(error))
                    continue
                recipe.options, recipe.reading = options, how
                recipe.loss_module = _loss_module(loss.function, activation)
                return recipe, likelihood
    if misses:
        raise RecipeError(misses[0])
    shapes = ", ".join(
        f"{type(call.module).__name__} gave {_shapes(call.output)}"
        for call in _calls(recording, preferred)
    )
    hint = (
        "; it is measured on the logits: call it on torch.sigmoid of an output of the "
        "network, or use F.binary_cross_entropy_with_logits"
        if loss.function == "binary_cross_entropy"
        else ""
    )
    raise RecipeError(
        f"the input of {loss.text()} (shape {tuple(loss.input.shape)}) is not an output of the "
        "network, whole, sliced along its positions, flattened or with its classes moved "
        f"({shapes or 'the network was not called'}){hint}"
    )


def _loss_module(function: str, activation: str | None) -> type[nn.Module]:
    """The loss module a call is read as (``F.nll_loss`` on log_softmax: cross-entropy)."""
    if activation == "log_softmax":
        return nn.CrossEntropyLoss
    if activation == "sigmoid":
        return nn.BCEWithLogitsLoss
    return FUNCTIONAL_LOSSES[function]


def _options(loss: LossCall) -> dict[str, Any]:
    """The loss's options, with ``reduction="none"`` resolved to the mean or sum after it."""
    options = dict(loss.options)
    if options.get("reduction") != "none":
        return options
    if loss.reduced_by in ("mean", "sum"):
        options["reduction"] = loss.reduced_by
        return options
    after = f"followed by {loss.reduced_by}" if loss.reduced_by else "never reduced"
    raise RecipeError(
        f"{loss.text()} is {after}: the monitor cannot tell how the per-element losses are "
        "weighted. A mask of padded positions is `ignore_index` (set their targets to -100, "
        "e.g. `labels.masked_fill(mask == 0, -100)`, and use reduction 'mean'); a plain "
        "`.mean()` or `.sum()` of the losses is read as reduction 'mean' or 'sum'"
    )


def _likelihood(
    loss: LossCall, options: dict[str, Any], activation: str | None, given: Likelihood | None
) -> tuple[Likelihood, str | None]:
    """The likelihood of the loss, or ``given``; how the loss was read, when it matters."""
    function, how = loss.function, None
    if activation == "log_softmax":
        function = "cross_entropy"
        how = "F.nll_loss on log_softmax of the logits: measured as the cross-entropy of the logits"
    elif activation == "sigmoid":
        function = "binary_cross_entropy_with_logits"
        how = "F.binary_cross_entropy on sigmoid of the logits: measured as BCE with logits"
    if given is not None:
        return given, how
    try:
        return resolve_loss(functional_loss_module(function, options)), how
    except UnsupportedLossError as error:
        raise RecipeError(f"training_step calls {loss.text()}: {error}") from None


def _calls(recording: Recording, preferred: nn.Module) -> list[NetworkCall]:
    """Finished calls, the measured network's first, outermost first."""
    done = [call for call in recording.calls if call.done]
    return sorted(done, key=lambda call: (call.module is not preferred, call.index))


def _readings(
    call: NetworkCall, loss: LossCall, activation: str | None, outputs: Callable | None
) -> Iterator[tuple[OutputReading, Tensor]]:
    source = loss.input
    if outputs is not None:  # the user's outputs= is checked, not derived
        candidate = outputs(call.output)
        if isinstance(candidate, Tensor) and _user_reading_matches(loss, candidate, activation):
            yield _UserReading(outputs), candidate
        return
    for path, tensor in output_candidates(call.output):
        if loss.function in _CLASS_FUNCTIONS:
            yield from class_readings(path, tensor, source, activation)
        else:
            yield from elementwise_readings(path, tensor, source, activation)


def _user_reading_matches(loss: LossCall, candidate: Tensor, activation: str | None) -> bool:
    source = loss.input
    if loss.function in _CLASS_FUNCTIONS:
        if source.dim() < 2 or candidate.dim() < 2 or source.shape[1] != candidate.shape[1]:
            return False
        if activation == "log_softmax":
            candidate = candidate.log_softmax(dim=1)
        return source.numel() == candidate.numel() and bool(
            (rows(candidate).to(source.dtype) == rows(source)).all()
        )
    flat = candidate.reshape(-1).sigmoid() if activation == "sigmoid" else candidate.reshape(-1)
    return flat.numel() == source.numel() and bool(
        (flat.to(source.dtype) == source.reshape(-1)).all()
    )


class _UserReading(OutputReading):
    """The user's ``outputs=`` in the place of a derived reading."""

    def __init__(self, function: Callable[[Any], Any]) -> None:
        super().__init__(())
        object.__setattr__(self, "function", function)

    @property
    def identity(self) -> bool:  # noqa: D102
        return False

    def __call__(self, raw: Any) -> Any:  # noqa: D102
        return self.function(raw)  # type: ignore[attr-defined]

    def text(self) -> str:  # noqa: D102
        return "outputs=(your function)"


def _recipe(
    recording: Recording,
    call: NetworkCall,
    loss: LossCall,
    reading: OutputReading,
    candidate: Tensor,
    need_targets: bool,
) -> Recipe:
    count = int(candidate.shape[0])
    targets, dropped = None, ()
    if need_targets:
        targets = _targets(recording, loss, candidate)
        if call.index in loss.inside and not _needs_labels(call.module):
            # the network computed the loss from this argument: the probe leaves it out
            source = fetch(recording.batch, targets.path)
            dropped = tuple(name for name, value in call.kwargs.items() if value is source)
    args, kwargs = argument_readings(recording, call, count, frozenset(dropped))
    return Recipe(
        network=call.module,
        network_name=call.name,
        args=args,
        kwargs=kwargs,
        output=reading,
        targets=targets,
        function=loss.function,
        options={},
        loss_text=loss.text(),
        nested=bool(loss.inside),
        dropped=dropped,
    )


def _needs_labels(module: nn.Module) -> bool:
    """Whether the network needs its labels to run (``labels=`` then stays in the probe).

    A Hugging Face encoder-decoder builds its decoder's inputs from them.
    """
    return bool(getattr(getattr(module, "config", None), "is_encoder_decoder", False))


def _targets(recording: Recording, loss: LossCall, candidate: Tensor) -> TargetReading:
    """The reading of the batch that gives the loss's targets, in the likelihood's layout."""
    target, count = loss.target, int(candidate.shape[0])
    classes = loss.function in _CLASS_FUNCTIONS
    if classes and target.is_floating_point():
        if target.shape != loss.input.shape or not _is_one_hot(target):
            raise RecipeError(
                f"{loss.text()} gets class probabilities (soft targets) of shape "
                f"{tuple(target.shape)}: they are not labels of the categorical likelihood, "
                "so the empirical Fisher of the labels is not defined. Pass class indices"
            )
        target = target.argmax(dim=1)
    sample_shape = tuple(candidate.shape[2:] if classes else candidate.shape[1:])
    pad = loss.options.get("ignore_index") if classes else None
    for path, source in target_sources(recording, loss.target, count):
        for reading in target_readings(path, source, target, sample_shape, pad):
            return reading
    names = [_label(path) for path, _ in target_sources(recording, loss.target, count)]
    raise RecipeError(
        f"the targets of {loss.text()} (shape {tuple(loss.target.shape)}) are none of the "
        f"batch's entries with {count} samples ({', '.join(names) or 'none'}), whole, sliced "
        "along their positions, shifted, converted from one-hot, reshaped or cast"
    )


def _is_one_hot(values: Tensor) -> bool:
    ones = values == 1
    return bool(((values == 0) | ones).all() and (ones.sum(dim=1) == 1).all())


def _label(path) -> str:
    from fisher_monitor.callback.recording import path_text

    return path_text("batch", path)


def _shapes(output: Any) -> str:
    from fisher_monitor.callback.recording import walk_tensors

    shapes = [f"{tuple(t.shape)}" for _, t in walk_tensors(output)]
    return ", ".join(shapes[:4]) or type(output).__name__


__all__ = ["NoLossSeen", "SUPPORTED_TEXT", "derive"]
