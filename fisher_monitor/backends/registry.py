"""The registry of backends, and the choice between them (``backend="auto"``).

Three backends are registered (:data:`REGISTRY`):

- ``"backpack"``: BackPACK backpropagates the loss side through supported modules and
  keeps compact per-layer factors (fast; ``Linear`` and convolutions as outer products);
  it must follow the whole network module by module;
- ``"autograd"``: module hooks and batched backward passes, for any forward code between
  the layers, with the same compact factors for ``Linear``, convolutions and ``Conv1D``,
  ``torch.func`` pull-backs per module for other layers, and tied weights;
- ``"functorch"``: ``torch.func`` vector-Jacobian products per sample through the whole
  network, for anything differentiable.

``"auto"`` tries them in :data:`AUTO_ORDER`: a backend that cannot handle the network
(:class:`~fisher_monitor.backends.base.UnsupportedNetworkError`) or fails on it at run time
passes it on to the next, with a note that says why. Adding a backend is a module with a
:class:`~fisher_monitor.backends.base.Backend` subclass, a line in :data:`REGISTRY` and its
place in :data:`AUTO_ORDER`.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from fisher_monitor.backends.autograd import AutogradNetwork
from fisher_monitor.backends.backpack import BackpackNetwork
from fisher_monitor.backends.base import Backend, UnsupportedNetworkError
from fisher_monitor.backends.functorch import FunctorchNetwork
from fisher_monitor.backends.pass_context import OutputAdapter
from fisher_monitor.likelihoods import Likelihood

#: Every backend by its name (``backend=``).
REGISTRY: dict[str, type[Backend]] = {
    "backpack": BackpackNetwork,
    "autograd": AutogradNetwork,
    "functorch": FunctorchNetwork,
}
#: The order in which ``backend="auto"`` tries them.
AUTO_ORDER: tuple[str, ...] = ("backpack", "autograd", "functorch")
#: How notes name each backend.
LABELS: dict[str, str] = {
    "backpack": "BackPACK",
    "autograd": "autograd with module hooks",
    "functorch": "torch.func",
}

#: Names of the built-in backends accepted by ``backend=`` (see :func:`backend_names`).
BACKENDS: tuple[str, ...] = ("auto", *REGISTRY)
_AUTO: list[str] = list(AUTO_ORDER)


def backend_names() -> tuple[str, ...]:
    """Every name ``backend=`` accepts now: ``"auto"`` and the registered backends."""
    return ("auto", *REGISTRY)


def auto_order() -> tuple[str, ...]:
    """The order ``backend="auto"`` tries the backends in, registered ones included."""
    return tuple(_AUTO)


def register_backend(
    cls: type[Backend], label: str | None = None, before: str | None = "functorch"
) -> type[Backend]:
    """Register a backend under ``cls.backend`` (usable as a class decorator).

    Args:
        cls: A :class:`~fisher_monitor.backends.base.Backend` subclass.
        label: How notes name it (default: its registry name).
        before: Its place in ``backend="auto"``'s order: before this backend (``None``:
            not tried by ``"auto"``, only when asked for by name).

    Raises:
        TypeError: If ``cls`` is not a ``Backend`` subclass.
        ValueError: If its name is taken or ``before`` names no registered backend.
    """
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"Only Backend subclasses can be registered, got {cls!r}.")
    name = getattr(cls, "backend", None)
    existing = REGISTRY.get(name, cls) if isinstance(name, str) else None
    again = existing is not None and (existing.__module__, existing.__qualname__) == (
        cls.__module__,
        cls.__qualname__,
    )
    if not isinstance(name, str) or name == "auto" or not again:
        raise ValueError(
            f"Invalid backend name {name!r}: set a new `backend` class attribute (taken: "
            f"{backend_names()})."
        )
    if before is not None and before not in _AUTO:
        raise ValueError(f"Invalid before: {before!r}. Supported: {auto_order()} or None.")
    REGISTRY[name] = cls
    LABELS[name] = label or name
    if name in _AUTO:
        _AUTO.remove(name)
    if before is not None:
        _AUTO.insert(_AUTO.index(before), name)
    return cls


def check_backend(backend: str) -> str:
    """Validate a ``backend=`` argument.

    Raises:
        ValueError: Naming the bad value and the supported ones.
    """
    if backend not in backend_names():
        raise ValueError(f"Invalid backend: {backend!r}. Supported: {backend_names()}.")
    return backend


def prepare(
    model: nn.Module,
    likelihood: Likelihood,
    backend: str = "auto",
    outputs: OutputAdapter | None = None,
) -> Backend:
    """Prepare ``model`` with the named backend.

    ``"auto"`` takes the first of :data:`AUTO_ORDER` that can handle the network, with a
    note for each one passed over.

    Args:
        model: The caller's network.
        likelihood: The likelihood of the loss.
        backend: ``"auto"`` or a name of :data:`REGISTRY`.
        outputs: The loss's input from the network's raw output (``None``: its logits).

    Returns:
        The prepared backend.

    Raises:
        UnsupportedNetworkError: If the named backend cannot handle the network (with
            ``"auto"``: if none can).
    """
    if backend != "auto":
        return REGISTRY[check_backend(backend)](model, likelihood, outputs)
    return fallback(model, likelihood, None, "", outputs)


def fallback(
    model: nn.Module,
    likelihood: Likelihood,
    after: str | None,
    why: str,
    outputs: OutputAdapter | None = None,
) -> Backend:
    """Prepare the first backend of :data:`AUTO_ORDER` after ``after`` that handles ``model``.

    Args:
        model: The caller's network.
        likelihood: The likelihood of the loss.
        after: The backend that failed (``None``: start from the first).
        why: Why it failed (the start of the note), e.g. ``"BackPACK cannot trace …"``.
        outputs: The loss's input from the network's raw output.

    Raises:
        UnsupportedNetworkError: The last backend's, when none of the rest can.
    """
    order = list(_AUTO)
    remaining = order[order.index(after) + 1 :] if after is not None else order
    reasons = [why] if why else []
    refused = _refusals(model, likelihood, outputs)
    for index, name in enumerate(remaining):
        if name in refused and index < len(remaining) - 1:
            reasons.append(refused[name])
            continue
        try:
            network = REGISTRY[name](model, likelihood, outputs)
        except UnsupportedNetworkError as error:
            if index == len(remaining) - 1:
                raise
            reasons.append(refused.setdefault(name, f"{LABELS[name]} {error.reason}"))
            continue
        if reasons:
            network.preparation_notes.insert(
                0, f"{'; '.join(reasons)}: measured with {LABELS[name]} instead"
            )
        return network
    raise UnsupportedNetworkError(after or "auto", "has no backend left to try")


#: Per model (weakly held): the backends that refused to prepare it, by the model's
#: structure, likelihood and output adapter. A one-shot ``measure()`` called again on the
#: same network does not redo a failed preparation (BackPACK's torch.fx trace of a UNet
#: fails after 80 ms, 5 training steps); a changed module tree is tried afresh.
_REFUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _refusals(
    model: nn.Module, likelihood: Likelihood, outputs: OutputAdapter | None
) -> dict[str, str]:
    """The reasons backends gave for refusing this model as it is now (to be filled)."""
    signature = (
        type(likelihood),
        outputs,
        tuple((name, type(module)) for name, module in model.named_modules()),
    )
    try:
        return _REFUSED.setdefault(model, {}).setdefault(signature, {})
    except TypeError:  # no weak reference to the model, or an unhashable adapter
        return {}


def is_backend_failure(error: BaseException) -> bool:
    """Whether a run-time error may be the backend's own limitation, worth the next backend.

    Not: non-finite values (:class:`FloatingPointError`), running out of memory, or a
    loss or batch the likelihood refuses (``ValueError``) — another backend would fail
    alike. Anything else (a backend that cannot follow the network, a graph converter's
    module that rejects an argument, a shape error inside BackPACK) is.
    """
    if isinstance(error, UnsupportedNetworkError):
        return True
    if isinstance(error, (FloatingPointError, MemoryError, torch.OutOfMemoryError)):
        return False
    if isinstance(error, ValueError):
        return False
    text = str(error)
    if "out of memory" in text or "can't allocate memory" in text:
        return False
    return isinstance(error, (RuntimeError, TypeError, AssertionError, IndexError, KeyError))


def is_backpack_failure(error: BaseException) -> bool:
    """Whether a run-time error is one of BackPACK's own limitations (not the user's input).

    BackPACK's Jacobians of some modules (average pooling, embeddings) use the default
    dtype, so a float64 network under a float32 default fails with "expected scalar type";
    such errors are worth a retry with ``torch.func``.
    """
    text = str(error)
    if isinstance(error, AssertionError) and "BackPACK" in text:
        return True  # an internal consistency check of BackPACK's (e.g. at a Dropout)
    return isinstance(error, RuntimeError) and (
        "expected scalar type" in text
        or "expected m1 and m2 to have the same dtype" in text
        or "must have the same dtype" in text
        or "found dtype" in text.lower()
    )


__all__ = [
    "AUTO_ORDER",
    "auto_order",
    "backend_names",
    "register_backend",
    "BACKENDS",
    "LABELS",
    "REGISTRY",
    "check_backend",
    "fallback",
    "is_backend_failure",
    "is_backpack_failure",
    "prepare",
]
