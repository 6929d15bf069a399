"""What every pass of a backend shares: the forward call, RNG, precision, output checks, result."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fisher_monitor.batching import ModelInputs

AUTOCAST_NOTE = "autocast (mixed precision) was active: measured in full precision"


@dataclass
class PassResult:
    """What one pass reports besides the per-layer factors.

    Attributes:
        loss: Value of the loss as the caller's loss module reduces it.
        batch_size: ``N``.
        measured: Names of layers whose factors were delivered.
        notes: Things the user should know about this pass.
        methods: Per layer, how its factors were formed where the backend varies it
            (e.g. ``"outer products"``, ``"per-sample pull-backs"``).
    """

    loss: float
    batch_size: int
    measured: list[str]
    notes: list[str] = field(default_factory=list)
    methods: dict[str, str] = field(default_factory=dict)


#: ``outputs(raw)``: the loss's input from what the network's ``forward`` returns.
OutputAdapter = Callable[[Any], Tensor]


def select_logits(raw: Any) -> Any:
    """The loss's input from a network's output, as most models return it.

    A tensor is the input itself; otherwise the ``logits`` of a Hugging Face ``ModelOutput``
    (or of any object with a ``logits`` attribute, or a mapping with a ``"logits"`` key),
    else the first element of a tuple or list.
    """
    if isinstance(raw, Tensor):
        return raw
    logits = getattr(raw, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(raw, Mapping) and isinstance(raw.get("logits"), Tensor):
        return raw["logits"]
    if isinstance(raw, (tuple, list)) and raw and isinstance(raw[0], Tensor):
        return raw[0]
    return raw


def call_network(network, inputs: ModelInputs, outputs: OutputAdapter | None = None) -> Tensor:
    """Run ``network`` on ``inputs`` and return the loss's input (checked to be a tensor).

    Args:
        network: The (prepared) network.
        inputs: Its positional and keyword arguments.
        outputs: The loss's input from the raw output (``None``: :func:`select_logits`).
    """
    raw = network(*inputs.args, **inputs.kwargs)
    selected = (outputs or select_logits)(raw)
    check_outputs(selected, raw)
    return selected


def check_outputs(outputs, raw=None) -> None:
    """Raise a clear error unless the loss's input is one tensor."""
    if not isinstance(outputs, Tensor):
        kind = type(raw if raw is not None else outputs).__name__
        raise TypeError(
            "The measured network must give the loss one tensor (its logits or predictions), "
            f"got a {kind}. Pass `outputs=lambda out: ...` to measure() (FisherMonitor: "
            "`outputs=`) to pick the loss's input from it, or measure the sub-network that "
            "produces the logits (FisherMonitor(network='...') or measure(model.net, ...))."
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
    "OutputAdapter",
    "PassResult",
    "call_network",
    "check_loss",
    "check_outputs",
    "forked_rng",
    "full_precision",
    "seed_from",
    "select_logits",
]
