"""What every forward/backward pass of a backend shares: RNG, precision, output checks, result."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

AUTOCAST_NOTE = "autocast (mixed precision) was active: measured in full precision"


@dataclass
class PassResult:
    """What one pass reports besides the per-layer factors.

    Attributes:
        loss: Value of the loss as the caller's loss module reduces it.
        batch_size: ``N``.
        measured: Names of layers whose factors were delivered.
        notes: Things the user should know about this pass.
    """

    loss: float
    batch_size: int
    measured: list[str]
    notes: list[str] = field(default_factory=list)


def check_outputs(outputs) -> None:
    """Raise a clear error unless the network returned one tensor (the loss input)."""
    if not isinstance(outputs, Tensor):
        raise TypeError(
            "The measured network must return one tensor, the input of the loss, got a "
            f"{type(outputs).__name__}. Measure the sub-network that produces the logits "
            "(FisherMonitor(network='...') or measure(model.net, ...))."
        )


def check_loss(loss: Tensor) -> None:
    """Raise ``FloatingPointError`` for a non-finite probe loss."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"The probe loss is {loss.item()!r}; skipping the measurement.")


@contextmanager
def full_precision(device: torch.device, notes: list[str]) -> Iterator[None]:
    """Disable autocast for a pass (mixed precision would round the curvature); note it."""
    if torch.is_autocast_enabled(device.type) and AUTOCAST_NOTE not in notes:
        notes.append(AUTOCAST_NOTE)
    with torch.autocast(device_type=device.type, enabled=False):
        yield


@contextmanager
def forked_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Run with the global RNG (CPU and the network's CUDA device) seeded, then restore it."""
    cuda = device.type == "cuda"
    index = (
        (device.index if device.index is not None else torch.cuda.current_device()) if cuda else 0
    )
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def seed_from(generator: torch.Generator | None) -> int:
    """Draw a seed from ``generator``, or from the OS when there is none.

    The global RNG is never consumed.
    """
    if generator is None:
        return int.from_bytes(os.urandom(7), "little")
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))


__all__ = [
    "AUTOCAST_NOTE",
    "PassResult",
    "check_loss",
    "check_outputs",
    "forked_rng",
    "full_precision",
    "seed_from",
]
