"""Probe batches: the network's arguments, sub-sampling, validation and the move to its device.

A probe batch is the network's inputs for ``N`` samples and the loss's targets. The inputs
are what the network's ``forward`` takes:

- a tensor (one positional argument), or a tuple or list of them (positional arguments);
- a mapping (keyword arguments), e.g. a Hugging Face batch
  ``{"input_ids": ..., "attention_mask": ...}``;
- :class:`ModelInputs`, for positional and keyword arguments together.

:func:`model_inputs` turns any of these into :class:`ModelInputs`. A tensor argument whose
first dimension is ``N`` is split per sample; any other argument (a ``(1, T)`` position
index, a flag, ``None``) is passed to every sample as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class ModelInputs:
    """The arguments of the network's ``forward`` for a batch.

    Attributes:
        args: Positional arguments.
        kwargs: Keyword arguments.
    """

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> list[Tensor]:
        """Every tensor among the arguments, positional ones first."""
        values = [*self.args, *self.kwargs.values()]
        return [value for value in values if isinstance(value, Tensor)]

    def batch_size(self) -> int | None:
        """``N``: the first dimension of the first batched tensor argument, if any."""
        for tensor in self.tensors():
            if tensor.dim():
                return int(tensor.shape[0])
        return None

    def signature(self) -> tuple:
        """What determines the network's shapes: every argument's per-sample shape."""

        def shape(value):
            return tuple(value.shape[1:]) if isinstance(value, Tensor) else type(value).__name__

        return (
            tuple(shape(a) for a in self.args),
            tuple((k, shape(v)) for k, v in sorted(self.kwargs.items())),
        )


def model_inputs(inputs: Any) -> ModelInputs:
    """The network's arguments from any form of probe inputs (see the module docstring).

    Raises:
        TypeError: For inputs of another type.
    """
    if isinstance(inputs, ModelInputs):
        return inputs
    if isinstance(inputs, Tensor):
        return ModelInputs((inputs,))
    if isinstance(inputs, (tuple, list)):
        return ModelInputs(tuple(inputs))
    if isinstance(inputs, Mapping):
        names = [key for key in inputs if not isinstance(key, str)]
        if names:
            raise TypeError(
                f"inputs given as a mapping must have string keys (the forward's keyword "
                f"arguments), got {names[0]!r}."
            )
        return ModelInputs((), dict(inputs))
    raise TypeError(
        f"inputs must be a tensor, a tuple or list of tensors, a mapping of keyword arguments "
        f"or ModelInputs, got {type(inputs).__name__}."
    )


def map_tensors(value, fn: Callable[[Tensor], Tensor]):
    """Apply ``fn`` to every tensor of a (nested) tuple, list, mapping or :class:`ModelInputs`.

    Anything else is returned as it is.
    """
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, ModelInputs):
        return ModelInputs(map_tensors(value.args, fn), map_tensors(value.kwargs, fn))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, Mapping):
        return {key: map_tensors(v, fn) for key, v in value.items()}
    return value


def take_samples(value, count: int, batch: int | None = None):
    """The first ``count`` samples of every batched tensor (first dimension ``batch``).

    With ``batch=None`` every tensor with a first dimension is cut (positional inputs,
    which must all be batched); otherwise tensors of another first dimension are kept.
    """

    def cut(tensor: Tensor) -> Tensor:
        if not tensor.dim() or (batch is not None and tensor.shape[0] != batch):
            return tensor
        return tensor[:count]

    return map_tensors(value, cut)


def is_batched(value: Any, batch: int) -> bool:
    """Whether an argument is split per sample: a tensor whose first dimension is ``batch``."""
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch


def batch_on_device(inputs, targets, device: torch.device, dtype: torch.dtype):
    """Validate the probe batch, move it to the network's device, match its float type.

    Floating-point inputs are cast to the type the network computes in (e.g. float64
    inputs for a float32 network, or a half-precision network measured in float32);
    integer inputs (token ids for an embedding) and masks are left as they are.

    Returns:
        ``(ModelInputs, targets)`` on the device.

    Raises:
        TypeError: For targets that are not a tensor, or inputs of an unknown form.
        ValueError: For an empty batch, or positional inputs and targets that disagree on
            the batch size (or keyword inputs none of which has it).
    """
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}.")
    arguments = model_inputs(inputs)
    for value in arguments.args:
        if not isinstance(value, Tensor):
            raise TypeError(f"inputs must be tensors, got {type(value).__name__}.")
    batch = targets.shape[0] if targets.dim() else None
    if batch is None:
        raise ValueError("targets must have a batch dimension, got a scalar.")
    if batch == 0:
        raise ValueError("The probe batch is empty (0 samples): nothing to measure.")
    for tensor in arguments.args:
        if tensor.dim() == 0 or tensor.shape[0] != batch:
            raise ValueError(
                f"inputs of shape {tuple(tensor.shape)} and targets of shape "
                f"{tuple(targets.shape)} disagree on the batch size."
            )
    if not arguments.args and not any(is_batched(v, batch) for v in arguments.kwargs.values()):
        shapes = {k: tuple(v.shape) for k, v in arguments.kwargs.items() if isinstance(v, Tensor)}
        raise ValueError(
            f"No keyword input has the targets' batch size {batch} as its first dimension "
            f"(inputs {shapes}, targets {tuple(targets.shape)})."
        )

    def move(tensor: Tensor) -> Tensor:
        if tensor.is_floating_point():
            return tensor.to(device=device, dtype=dtype)
        return tensor.to(device)

    return map_tensors(arguments, move), targets.to(device)


__all__ = [
    "ModelInputs",
    "batch_on_device",
    "is_batched",
    "map_tensors",
    "model_inputs",
    "take_samples",
]
