"""The backend contract, the registry of backends, and the choice between them.

A backend prepares a shadow copy of the caller's network once and then, per measurement,
runs one pass that delivers every layer's factors (:class:`~fisher_monitor.curvature.
factors.LayerFactors`) to a callback, output layer first. Two are registered:

- ``"backpack"``: BackPACK backpropagates the loss side through supported modules and
  keeps compact per-layer factors (fast; ``Linear`` and convolutions as outer products);
- ``"functorch"``: ``torch.func`` vector-Jacobian products per sample, for any
  differentiable network (attention, multi-input modules, functional forward code).

``"auto"`` prepares BackPACK and falls back to ``torch.func`` when BackPACK cannot handle
the network (:class:`UnsupportedNetworkError`) or fails on it at run time (e.g. BackPACK's
dtype bugs), with a note that says why.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor, nn

from fisher_monitor.curvature.factors import LayerFactors
from fisher_monitor.curvature.layers import LayerInfo
from fisher_monitor.curvature.passes import PassResult
from fisher_monitor.curvature.shadow import ShadowNetwork
from fisher_monitor.likelihoods import Likelihood

#: ``on_layer(info, factors)``: receives each layer's factors during a pass.
LayerCallback = Callable[[LayerInfo, LayerFactors], None]


class UnsupportedNetworkError(NotImplementedError):
    """A backend cannot handle the network.

    Attributes:
        backend: The backend's name.
        reason: Short reason, e.g. ``"cannot handle module(s) '1' (GELU)"``.
        modules: The offending modules as ``"'name' (Type)"`` strings (may be empty).
        fix: What the user can do.
    """

    def __init__(self, backend: str, reason: str, modules: list[str] | None = None, fix: str = ""):
        self.backend = backend
        self.reason = reason
        self.modules = list(modules or [])
        self.fix = fix
        super().__init__(f"fisher-monitor's {backend} backend {reason}. {fix}".strip())


class Backend(ShadowNetwork, ABC):
    """A prepared network that measures per-layer factors (see the module docstring).

    Args:
        model: The caller's network (left untouched).
        likelihood: The likelihood of the loss.

    Raises:
        UnsupportedNetworkError: If this backend cannot handle the network.
    """

    #: Registry name.
    backend: str

    @abstractmethod
    def run(
        self,
        inputs,
        targets: Tensor,
        exact: bool,
        mc_samples: int,
        seed: int,
        on_layer: LayerCallback,
        dtype: torch.dtype = torch.float64,
    ) -> PassResult:
        """One pass over the probe batch; ``on_layer`` receives each layer's factors.

        Args:
            inputs: Input batch (tensor, or tuple/list of tensors passed as arguments).
            targets: Targets for the loss.
            exact: Exact Fisher, or ``mc_samples`` sampled labels per sample.
            mc_samples: Number of sampled labels per sample for the Monte-Carlo Fisher.
            seed: Seed of the global RNG during the pass (label sampling, dropout); the
                RNG state is restored afterwards.
            on_layer: Called with each layer's info and factors, output layer first.
            dtype: Floating-point type of Gram matrices and dense blocks.

        Returns:
            Loss value, batch size, the measured layers and this pass's notes.
        """


def _registry() -> dict[str, type[Backend]]:
    from fisher_monitor.curvature.backpack_backend import BackpackNetwork
    from fisher_monitor.curvature.functorch_backend import FunctorchNetwork

    return {"backpack": BackpackNetwork, "functorch": FunctorchNetwork}


#: Names accepted by ``backend=``.
BACKENDS: tuple[str, ...] = ("auto", "backpack", "functorch")


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
    registry = _registry()
    if backend != "auto":
        return registry[check_backend(backend)](model, likelihood)
    try:
        return registry["backpack"](model, likelihood)
    except UnsupportedNetworkError as error:
        return fallback(model, likelihood, f"BackPACK {error.reason}")


def fallback(model: nn.Module, likelihood: Likelihood, why: str) -> Backend:
    """Prepare the ``torch.func`` backend, noting why BackPACK is not used."""
    network = _registry()["functorch"](model, likelihood)
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
    "Backend",
    "LayerCallback",
    "UnsupportedNetworkError",
    "check_backend",
    "fallback",
    "is_backpack_failure",
    "prepare",
]
