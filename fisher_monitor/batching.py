"""Probe batches: nested inputs, sub-sampling, validation and the move to the network's device."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def map_tensors(value, fn: Callable[[Tensor], Tensor]):
    """Apply ``fn`` to a tensor, or to each tensor of a (nested) tuple or list of them."""
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    return fn(value)


def take_samples(value, count: int):
    """The first ``count`` samples of an input tensor or of each of a tuple of them."""
    return map_tensors(value, lambda t: t[:count])


def batch_on_device(inputs, targets, device: torch.device, dtype: torch.dtype):
    """Validate the probe batch, move it to the network's device, match its float type.

    Floating-point inputs are cast to the type the network computes in (e.g. float64
    inputs for a float32 network, or a half-precision network measured in float32);
    integer inputs (token ids for an embedding) are left as they are.
    """
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}.")
    tensors = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    for tensor in tensors:
        if not isinstance(tensor, Tensor):
            raise TypeError(f"inputs must be tensors, got {type(tensor).__name__}.")
    batch = targets.shape[0] if targets.dim() else None
    if batch is None:
        raise ValueError("targets must have a batch dimension, got a scalar.")
    if batch == 0:
        raise ValueError("The probe batch is empty (0 samples): nothing to measure.")
    for tensor in tensors:
        if tensor.dim() == 0 or tensor.shape[0] != batch:
            raise ValueError(
                f"inputs of shape {tuple(tensor.shape)} and targets of shape "
                f"{tuple(targets.shape)} disagree on the batch size."
            )
    moved = tuple(
        t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in tensors
    )
    return (moved if isinstance(inputs, (tuple, list)) else moved[0]), targets.to(device)
