"""The registry of backends, and the choice between them (``backend="auto"``).

Two backends are registered (:data:`BACKENDS`):

- ``"backpack"``: BackPACK backpropagates the loss side through supported modules and
  keeps compact per-layer factors (fast; ``Linear`` and convolutions as outer products);
- ``"functorch"``: ``torch.func`` vector-Jacobian products per sample, for any
  differentiable network (attention, multi-input modules, functional forward code).

``"auto"`` prepares BackPACK and falls back to ``torch.func`` when BackPACK cannot handle
the network (:class:`~fisher_monitor.backends.base.UnsupportedNetworkError`) or fails on it
at run time (e.g. BackPACK's dtype bugs), with a note that says why. Adding a backend is a
module with a :class:`~fisher_monitor.backends.base.Backend` subclass and a line in
:data:`REGISTRY`.
"""

from __future__ import annotations

from torch import nn

from fisher_monitor.backends.backpack import BackpackNetwork
from fisher_monitor.backends.base import Backend, UnsupportedNetworkError
from fisher_monitor.backends.functorch import FunctorchNetwork
from fisher_monitor.likelihoods import Likelihood

#: Every backend by its name (``backend=``), in the order ``"auto"`` tries them.
REGISTRY: dict[str, type[Backend]] = {
    "backpack": BackpackNetwork,
    "functorch": FunctorchNetwork,
}

#: Names accepted by ``backend=``.
BACKENDS: tuple[str, ...] = ("auto", *REGISTRY)


def check_backend(backend: str) -> str:
    """Validate a ``backend=`` argument.

    Raises:
        ValueError: Naming the bad value and the supported ones.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}. Supported: {BACKENDS}.")
    return backend


def prepare(model: nn.Module, likelihood: Likelihood, backend: str = "auto") -> Backend:
    """Prepare ``model`` with the named backend (``"auto"``: BackPACK, else ``torch.func``).

    Args:
        model: The caller's network.
        likelihood: The likelihood of the loss.
        backend: ``"auto"``, ``"backpack"`` or ``"functorch"``.

    Returns:
        The prepared backend.

    Raises:
        UnsupportedNetworkError: If the named backend cannot handle the network (with
            ``"auto"``: if neither can).
    """
    if backend != "auto":
        return REGISTRY[check_backend(backend)](model, likelihood)
    try:
        return REGISTRY["backpack"](model, likelihood)
    except UnsupportedNetworkError as error:
        return fallback(model, likelihood, f"BackPACK {error.reason}")


def fallback(model: nn.Module, likelihood: Likelihood, why: str) -> Backend:
    """Prepare the ``torch.func`` backend, noting why BackPACK is not used."""
    network = REGISTRY["functorch"](model, likelihood)
    network.preparation_notes.insert(0, f"{why}: measured with torch.func instead")
    return network


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
    "BACKENDS",
    "REGISTRY",
    "check_backend",
    "fallback",
    "is_backpack_failure",
    "prepare",
]
