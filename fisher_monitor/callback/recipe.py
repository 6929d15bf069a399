"""The probe recipe: how any training batch becomes the probe of the loss ``training_step`` uses.

Derived from a recorded step (:mod:`fisher_monitor.callback.recording`) by trying a small
set of readings and keeping the one that reproduces the recorded values *exactly*:

- **the network's call**: each argument an entry of the batch (``batch["input_ids"]``,
  ``batch[0]``, possibly cast or reshaped per sample) or a constant; a keyword argument
  that only carries the labels of a loss the network computes itself (Hugging Face's
  ``labels=``) is left out;
- **the loss's input** from the network's output: the output itself, its ``logits`` (or
  another entry), with the class axis last or on dimension 1, optionally a slice of the
  positions (the causal-LM shift ``logits[:, :-1]``) or one position (``[:, 0]``), and
  flattened over samples and positions or not (``logits.view(-1, V)``); ``log_softmax``
  before ``F.nll_loss`` and ``sigmoid`` before ``F.binary_cross_entropy`` are recognised
  and measured as the cross-entropy or the Bernoulli likelihood of the logits;
- **the targets** per sample: a batch entry, optionally sliced (``labels[:, 1:]``),
  shifted and padded with ``ignore_index`` as Hugging Face does, converted from one-hot,
  reshaped and cast as the loss saw them.

The recipe gives the probe in the layout of :mod:`fisher_monitor.likelihoods`: outputs
``(N, C, *positions)`` with targets ``(N, *positions)`` for class labels, and the same
shape for both otherwise, whatever the flattening ``training_step`` did.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from fisher_monitor.batching import ModelInputs, map_tensors
from fisher_monitor.callback.recording import Path, fetch, path_text, walk_tensors

#: Batch keys tried first as the targets' source when several entries hold the same values.
_TARGET_NAMES = ("labels", "label", "targets", "target", "y")
Positions = slice | int | None


class RecipeError(ValueError):
    """The recorded step cannot be turned into a probe recipe (the message says why)."""


# ---------------------------------------------------------------------- the pieces


@dataclass(frozen=True)
class FromBatch:
    """An argument taken from the batch, cast and reshaped per sample as recorded."""

    path: Path
    dtype: torch.dtype | None = None
    sample_shape: tuple[int, ...] | None = None

    def build(self, batch: Any) -> Any:  # noqa: D102
        value = fetch(batch, self.path)
        if self.sample_shape is not None:
            value = value.reshape(value.shape[0], *self.sample_shape)
        return value if self.dtype is None else value.to(self.dtype)

    def text(self) -> str:  # noqa: D102
        text = path_text("batch", self.path)
        if self.sample_shape is not None:
            text += f".reshape(N, {', '.join(map(str, self.sample_shape))})"
        return text if self.dtype is None else f"{text}.to({self.dtype})"


@dataclass(frozen=True)
class Constant:
    """An argument that is the same at every step (a flag, ``None``, a shared tensor)."""

    value: Any

    def build(self, batch: Any) -> Any:  # noqa: D102
        return self.value

    def text(self) -> str:  # noqa: D102
        value = self.value
        return f"<tensor {tuple(value.shape)}>" if isinstance(value, Tensor) else repr(value)


Argument = FromBatch | Constant


@dataclass(frozen=True)
class OutputReading:
    """The loss's input, per sample, from the network's output.

    Attributes:
        path: Where the tensor sits in the output (``()``: the output is the tensor).
        class_last: Move the class axis from last to dimension 1 (class labels only).
        positions: A slice or an index of the first position axis, or ``None``.
        classes: Whether the loss takes class labels (positions start at dimension 2).
    """

    path: Path
    class_last: bool = False
    positions: Positions = None
    classes: bool = True

    @property
    def identity(self) -> bool:
        """Whether the loss's input is the network's output tensor itself."""
        return not self.path and not self.class_last and self.positions is None

    def __call__(self, raw: Any) -> Any:
        """The loss's input from what the network returned (a tensor, unless it is not)."""
        value = fetch(raw, self.path)
        if not isinstance(value, Tensor):
            return value
        if self.class_last and value.dim() >= 3:
            value = value.movedim(-1, 1)
        if self.positions is not None:
            axis = 2 if self.classes else 1
            value = value[(slice(None),) * axis + (self.positions,)]
        return value

    def text(self) -> str:  # noqa: D102
        text = path_text("output", self.path)
        if self.positions is not None:
            text += f"[:, {_index_text(self.positions)}]"
        return text + (" (classes last)" if self.class_last else "")


@dataclass(frozen=True)
class TargetReading:
    """The targets per sample from the batch.

    Attributes:
        path: The batch entry.
        positions: A slice or an index of dimension 1, or ``None``.
        pad_shift: Shift left by one position, filling the last with this value
            (Hugging Face's causal-LM labels), or ``None``.
        one_hot: Convert one-hot rows (dimension 1) to class indices.
        sample_shape: Reshape to ``(N, *sample_shape)`` (``-1`` allowed), or ``None``.
        dtype: Cast to this type, or ``None``.
    """

    path: Path
    positions: Positions = None
    pad_shift: int | None = None
    one_hot: bool = False
    sample_shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None

    def __call__(self, batch: Any) -> Tensor:  # noqa: D102
        value = fetch(batch, self.path)
        if not isinstance(value, Tensor):
            raise RecipeError(
                f"`FisherMonitor`: {path_text('batch', self.path)} is a "
                f"{type(value).__name__}, not the tensor of targets it was when the loss was "
                "found. Pass `batch_to_inputs_targets=lambda batch: (inputs, targets)`."
            )
        if self.one_hot:
            value = _one_hot_labels(value, self.path)
        if self.pad_shift is not None:
            value = F.pad(value, (0, 1), value=self.pad_shift)[:, 1:]
        if self.positions is not None:
            value = value[:, self.positions]
        if self.sample_shape is not None:
            value = value.reshape(value.shape[0], *self.sample_shape)
        return value if self.dtype is None else value.to(self.dtype)

    def text(self) -> str:  # noqa: D102
        text = path_text("batch", self.path)
        if self.one_hot:
            text += ".argmax(dim=1)"
        if self.pad_shift is not None:
            text += f" shifted left by one (last position {self.pad_shift})"
        if self.positions is not None:
            text += f"[:, {_index_text(self.positions)}]"
        return text


def _one_hot_labels(value: Tensor, path: Path) -> Tensor:
    ones = value == 1
    if not bool(((value == 0) | ones).all() and (ones.sum(dim=1) == 1).all()):
        raise RecipeError(
            f"`FisherMonitor`: {path_text('batch', path)} held one-hot labels when the loss "
            "was found, but this batch's are not one-hot (soft labels are not labels of the "
            "categorical likelihood). Pass `batch_to_inputs_targets=lambda batch: (inputs, "
            "class_indices)`."
        )
    return value.argmax(dim=1)


def _index_text(positions: slice | int) -> str:
    if isinstance(positions, int):
        return str(positions)
    start = "" if positions.start is None else str(positions.start)
    stop = "" if positions.stop is None else str(positions.stop)
    return f"{start}:{stop}"


@dataclass
class Recipe:
    """How to measure what ``training_step`` computes (see the module docstring).

    Attributes:
        network: The module to measure.
        network_name: Its qualified name in the LightningModule (``""``: itself).
        args: Its positional arguments.
        kwargs: Its keyword arguments.
        output: The loss's input from its output.
        targets: The targets from the batch (``None``: not derived).
        function: The loss function found, e.g. ``"cross_entropy"``.
        options: Its options (``reduction`` resolved for ``"none"`` followed by a mean).
        loss_text: The loss call as found, e.g. ``F.cross_entropy(ignore_index=-100)``.
        reading: How the loss was read, when it was read as another likelihood.
        nested: Whether the network computed the loss in its own ``forward``.
        dropped: Keyword arguments left out of the network's call (the labels of a loss
            the network computes itself).
        loss_module: The loss module the call is read as (``nn.CrossEntropyLoss`` for
            ``F.cross_entropy`` and for ``F.nll_loss`` on ``log_softmax``).
    """

    network: nn.Module
    network_name: str
    args: tuple[Argument, ...]
    kwargs: dict[str, Argument]
    output: OutputReading
    targets: TargetReading | None
    function: str
    options: dict[str, Any]
    loss_text: str
    reading: str | None = None
    nested: bool = False
    dropped: tuple[str, ...] = field(default_factory=tuple)
    loss_module: type[nn.Module] | None = None

    @property
    def outputs(self) -> Callable[[Any], Any] | None:
        """The ``outputs=`` adapter for the measurer (``None``: the output as it is)."""
        return None if self.output.identity else self.output

    def split(self, batch: Any) -> tuple[ModelInputs, Tensor]:
        """The probe ``(inputs, targets)`` of a training batch."""
        if self.targets is None:
            raise RecipeError("This recipe was derived without the targets.")
        args = tuple(argument.build(batch) for argument in self.args)
        kwargs = {name: argument.build(batch) for name, argument in self.kwargs.items()}
        return ModelInputs(args, kwargs), self.targets(batch)

    def call_text(self, owner: str) -> str:
        """``TinyLM(input_ids=batch['input_ids'])``."""
        module = f"{owner}.{self.network_name}" if self.network_name else owner
        parts = [argument.text() for argument in self.args]
        parts += [f"{name}={argument.text()}" for name, argument in self.kwargs.items()]
        return f"{module}({', '.join(parts)})"


def labelled_only(inputs: Any, targets: Tensor, likelihood: Any) -> tuple[Any, Tensor]:
    """The probe without the samples whose every target is ``ignore_index``.

    Such a sample has ``ℓ_n = 0``: it adds nothing to F, EF or the gradient, and dropping
    it keeps it out of ``N`` too, so that the measurement equals one without it.
    """
    kept = getattr(likelihood, "kept", None)
    if kept is None or not isinstance(targets, Tensor) or not targets.numel():
        return inputs, targets
    labelled = kept(targets).reshape(targets.shape[0], -1).any(dim=1)
    if bool(labelled.all()):
        return inputs, targets
    count = targets.shape[0]

    def cut(tensor: Tensor) -> Tensor:
        batched = tensor.dim() and tensor.shape[0] == count
        return tensor[labelled.to(tensor.device)] if batched else tensor

    return map_tensors(inputs, cut), targets[labelled]


# ---------------------------------------------------------------------- matching values


def _same(reference: Tensor, candidate: Tensor) -> bool:
    """Exactly equal values (after casting to the reference's type)."""
    if candidate.shape != reference.shape:
        return False
    if candidate.dtype != reference.dtype:
        candidate = candidate.to(reference.dtype)
    return candidate.device == reference.device and torch.equal(candidate, reference)


def _close(reference: Tensor, candidate: Tensor) -> bool:
    """Equal up to the rounding of recomputing an activation (``log_softmax``, ``sigmoid``)."""
    if candidate.shape != reference.shape or not reference.is_floating_point():
        return False
    candidate = candidate.to(reference.dtype)
    tolerance = 1e-5 if reference.element_size() >= 4 else 1e-2
    return bool(torch.allclose(candidate, reference, rtol=tolerance, atol=tolerance))


def rows(tensor: Tensor) -> Tensor:
    """Class-label layouts as rows: ``(N, C, *positions)`` to ``(N·T, C)``."""
    return tensor.movedim(1, -1).reshape(-1, tensor.shape[1])


def output_candidates(raw: Any) -> Iterator[tuple[Path, Tensor]]:
    """Tensors of a network's output, ``logits`` first (as :func:`select_logits` picks)."""
    found = list(walk_tensors(raw))
    preferred = [item for item in found if item[0][:1] == (("key", "logits"),)]
    yield from preferred + [item for item in found if item not in preferred]
    logits = getattr(raw, "logits", None)
    if isinstance(logits, Tensor) and not preferred:
        yield (("attr", "logits"),), logits


def _position_options(full: int, needed: int) -> Iterator[Positions]:
    """Readings of a position axis of ``full`` entries that leave ``needed`` of them.

    A slice drops ``full − needed`` positions at the end or at the start (the causal-LM
    shift), so that it holds for sequences of any length; one position is an index (the
    first, the last, any other), tried before a slice that happens to leave one.
    """
    if needed == full:
        yield None
    if needed == 1 and full > 1:
        yield 0
        yield -1
        yield from range(1, full - 1)
    if 0 < needed < full:
        yield slice(None, needed - full)
        yield slice(full - needed, None)


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def class_readings(
    path: Path, output: Tensor, source: Tensor, activation: str | None
) -> Iterator[tuple[OutputReading, Tensor]]:
    """Readings of ``output`` whose rows equal the class-label loss input ``source``."""
    if source.dim() < 2 or output.dim() < 2:
        return
    classes, count = source.shape[1], output.shape[0]
    if source.numel() % (classes * count):
        return
    needed = source.numel() // (classes * count)
    for class_last in _class_axes(output, classes):
        layout = output.movedim(-1, 1) if class_last else output
        axes = layout.shape[2:]
        options = [None] if _numel(axes) == needed else []
        if len(axes) == 1:
            options = list(_position_options(int(axes[0]), needed))
        for positions in options:
            reading = OutputReading(path, class_last, positions, classes=True)
            candidate = _apply(reading, output)
            if activation == "log_softmax":
                matches = _close(rows(source), rows(candidate.log_softmax(dim=1)))
            else:
                matches = _same(rows(source), rows(candidate))
            if matches:
                yield reading, candidate


def _class_axes(output: Tensor, classes: int) -> list[bool]:
    axes = []
    if output.shape[1] == classes:
        axes.append(False)
    if output.dim() >= 3 and output.shape[-1] == classes:
        axes.append(True)
    return axes


def _apply(reading: OutputReading, tensor: Tensor) -> Tensor:
    """``reading`` applied to the tensor it selects (its path already followed)."""
    return OutputReading((), reading.class_last, reading.positions, reading.classes)(tensor)


def elementwise_readings(
    path: Path, output: Tensor, source: Tensor, activation: str | None
) -> Iterator[tuple[OutputReading, Tensor]]:
    """Readings of ``output`` whose entries equal the elementwise loss input ``source``."""
    count = output.shape[0] if output.dim() else 0
    if not count or source.numel() % count:
        return
    needed = source.numel() // count
    options: list[Positions] = [None] if _numel(output.shape[1:]) == needed else []
    if output.dim() >= 2:
        inner = _numel(output.shape[2:])
        if needed % inner == 0:
            options += [
                p for p in _position_options(int(output.shape[1]), needed // inner) if p is not None
            ]
    for positions in options:
        reading = OutputReading(path, False, positions, classes=False)
        candidate = _apply(reading, output)
        flat, wanted = candidate.reshape(-1), source.reshape(-1)
        if activation == "sigmoid":
            matches = _close(wanted, flat.sigmoid())
        else:
            matches = _same(wanted, flat)
        if matches:
            yield reading, candidate


# ---------------------------------------------------------------------- targets


def target_sources(recording, target: Tensor, count: int) -> list[tuple[Path, Tensor]]:
    """Batch entries that may hold the targets, the likeliest first."""
    batch = recording.batch
    found = [(p, t) for p, t in walk_tensors(batch) if t.dim() and t.shape[0] == count]
    origin = recording.origins.get(id(target))

    def rank(item: tuple[Path, Tensor]) -> tuple[int, int]:
        path = item[0]
        name = path[-1][1] if path else None
        named = _TARGET_NAMES.index(name) if name in _TARGET_NAMES else len(_TARGET_NAMES)
        return (0 if path == origin else 1, named)

    return sorted(found, key=rank)


def target_readings(
    path: Path, source: Tensor, target: Tensor, sample_shape: tuple[int, ...], pad: int | None
) -> Iterator[TargetReading]:
    """Readings of the batch entry ``source`` that equal the recorded ``target``.

    Args:
        path: Where ``source`` sits in the batch.
        source: The batch entry, ``(N, …)``.
        target: What the loss received.
        sample_shape: The targets' shape per sample in the likelihood's layout.
        pad: The loss's ``ignore_index`` (for Hugging Face's shifted labels), or ``None``.
    """
    one_hot = (
        source.is_floating_point()
        and not target.is_floating_point()
        and source.dim() >= 2
        and source.shape[0] * _numel(sample_shape) == target.numel()
        and source.numel() != target.numel()
    )
    base = source.argmax(dim=1) if one_hot else source
    options: list[tuple[Positions, int | None]] = [(None, None)]
    if base.dim() == 2 and len(sample_shape) <= 1:
        full, needed = int(base.shape[1]), int(sample_shape[0]) if sample_shape else 1
        options += [(p, None) for p in _position_options(full, needed) if p is not None]
        if pad is not None and full == needed and full > 1:
            options.append((None, pad))
    wanted = target.reshape(-1)
    for positions, shift in options:
        candidate = base
        if shift is not None:
            candidate = F.pad(candidate, (0, 1), value=shift)[:, 1:]
        if positions is not None:
            candidate = candidate[:, positions]
        if candidate.numel() != wanted.numel() or not _same(wanted, candidate.reshape(-1)):
            continue
        shape = None
        if tuple(candidate.shape[1:]) != tuple(sample_shape):
            shape = (-1,) if len(sample_shape) == 1 else tuple(sample_shape)
        dtype = target.dtype if target.dtype != candidate.dtype else None
        yield TargetReading(path, positions, shift, one_hot, shape, dtype)


# ---------------------------------------------------------------------- the network's call


def argument_readings(
    recording, call, count: int, dropped: frozenset[str]
) -> tuple[tuple[Argument, ...], dict[str, Argument]]:
    """The network's arguments as batch entries and constants.

    Positional arguments after the first that is not a batched tensor are passed by
    keyword (the measurement splits positional arguments per sample).

    Raises:
        RecipeError: For an argument computed from the batch in a way it cannot replay.
    """
    args, kwargs = list(call.args), dict(call.kwargs)
    cut = next((i for i, a in enumerate(args) if not _batched(a, count)), len(args))
    if cut < len(args):
        try:
            bound = inspect.signature(call.module.forward).bind_partial(*args, **kwargs)
        except TypeError as error:
            raise RecipeError(f"cannot bind the network's arguments by name ({error})") from None
        names = list(bound.arguments)
        if any(
            inspect.signature(call.module.forward).parameters[n].kind
            is inspect.Parameter.VAR_POSITIONAL
            for n in names[cut : len(args)]
        ):
            raise RecipeError(
                "the network takes positional arguments without the batch dimension through "
                "*args, which the measurement cannot split per sample"
            )
        kwargs = {**dict(zip(names[cut : len(args)], args[cut:], strict=True)), **kwargs}
        args = args[:cut]
    positional = tuple(_argument(recording, value, count, f"#{i}") for i, value in enumerate(args))
    keywords = {
        name: _argument(recording, value, count, repr(name))
        for name, value in kwargs.items()
        if name not in dropped
    }
    return positional, keywords


def _batched(value: Any, count: int) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == count


def _argument(recording, value: Any, count: int, label: str) -> Argument:
    batch = recording.batch
    if isinstance(value, Tensor):
        path = recording.batch_paths.get(id(value))
        if path is not None:
            return FromBatch(path)
        reading = _derived_argument(recording, value, count)
        if reading is not None:
            return reading
        if not _batched(value, count):
            return Constant(value)
        raise RecipeError(
            f"the network's argument {label} (shape {tuple(value.shape)}) is computed in "
            "training_step from the batch in a way the monitor cannot replay"
        )
    if value is batch and not isinstance(value, Tensor):
        raise RecipeError(
            "the network takes the whole batch as one argument; the measurement needs its "
            "tensors as separate arguments to split them per sample"
        )
    nested = [t for _, t in walk_tensors(value) if _batched(t, count)]
    if nested and isinstance(value, (Mapping, tuple, list)):
        raise RecipeError(
            f"the network's argument {label} is a {type(value).__name__} holding batched "
            "tensors; the measurement splits only tensor arguments per sample"
        )
    return Constant(value)


def _derived_argument(recording, value: Tensor, count: int) -> FromBatch | None:
    """A batch entry cast or reshaped per sample into ``value``, if there is one."""
    origin = recording.origins.get(id(value))
    entries = list(walk_tensors(recording.batch))
    if origin is not None:
        entries.sort(key=lambda item: item[0] != origin)
    for path, entry in entries:
        if entry.numel() != value.numel() or not _batched(entry, count):
            continue
        if entry.shape == value.shape and _same(value, entry):
            return FromBatch(path, value.dtype if entry.dtype != value.dtype else None)
        if _batched(value, count) and _same(value, entry.reshape(value.shape)):
            dtype = value.dtype if entry.dtype != value.dtype else None
            return FromBatch(path, dtype, tuple(value.shape[1:]))
    return None


__all__ = [
    "Constant",
    "FromBatch",
    "OutputReading",
    "Recipe",
    "RecipeError",
    "TargetReading",
    "argument_readings",
    "labelled_only",
    "class_readings",
    "elementwise_readings",
    "output_candidates",
    "rows",
    "target_readings",
    "target_sources",
]
