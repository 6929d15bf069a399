"""The backend contract: what a backend delivers to the engine, and how it refuses a network.

A backend prepares a shadow copy of the caller's network once
(:class:`~fisher_monitor.backends.model_copy.ModelCopy`) and then, per measurement, runs one
pass that delivers every layer's factors (:class:`~fisher_monitor.factors.LayerFactors`)
to a callback, output layer first. A backend that cannot handle a network raises
:class:`UnsupportedNetworkError` when it is prepared, naming the modules and the fix, so
that ``backend="auto"`` can try the next one (:mod:`~fisher_monitor.backends.registry`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor, nn

from fisher_monitor.backends.model_copy import ModelCopy
from fisher_monitor.backends.pass_context import PassResult
from fisher_monitor.factors import LayerFactors, PassSize
from fisher_monitor.layers import LayerInfo
from fisher_monitor.likelihoods import Likelihood

#: ``on_layer(info, factors)``: receives each layer's factors during a pass.
LayerCallback = Callable[[LayerInfo, LayerFactors], None]

#: How a backend represents a layer's factors (the cost and memory models read it):
#: ``"outer"`` (outer products, ``Linear`` on ``(N, I)``), ``"shared"`` (sums of outer
#: products over positions: convolutions, sequence ``Linear``) or ``"materialised"``
#: (explicit ``N × D`` and ``R × D`` matrices).
FACTOR_FORMS: tuple[str, ...] = ("outer", "shared", "materialised")


#: Column tensors of a module-by-module backward pass alive at once, in units of the largest.
BACKPROP_COPIES = 4


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


class Backend(ModelCopy, ABC):
    """A prepared network that measures per-layer factors (see the module docstring).

    Subclasses set :attr:`backend` (the registry name), prepare the copy in ``__init__``
    (raising :class:`UnsupportedNetworkError` for a network they cannot handle) and
    implement :meth:`run`; :meth:`factor_form` tells the cost and memory models how a
    layer's factors will be represented.

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
        likelihood: Likelihood | None = None,
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
            likelihood: The likelihood whose loss side is backpropagated, if not the
                prepared one (the sketch passes a
                :class:`~fisher_monitor.likelihoods.sketched.SketchedLikelihood`).

        Returns:
            Loss value, batch size, the measured layers and this pass's notes.
        """

    def pass_bytes(
        self, size: PassSize, activations: int, largest_activation: int, dimension: int
    ) -> int:
        """Bytes the pass holds beyond the saved activations and the per-layer work.

        The default is a backward pass of the loss-side columns module by module (as
        BackPACK's): a few ``R_n·N`` column tensors around the largest activation.

        Args:
            size: The pass's samples and columns.
            activations: Output elements of all layers for one sample.
            largest_activation: The largest layer output of one sample (elements).
            dimension: ``D``, the network's measured parameters.
        """
        return (
            BACKPROP_COPIES
            * size.pass_columns
            * size.samples
            * largest_activation
            * (size.itemsize)
        )

    def factor_form(self, module: nn.Module, output: object) -> str:
        """How this backend represents the factors of a layer (one of :data:`FACTOR_FORMS`).

        Args:
            module: The layer's module in the prepared network.
            output: The module's output for one sample (from the cost model's profile).
        """
        return "materialised"


__all__ = ["FACTOR_FORMS", "Backend", "LayerCallback", "UnsupportedNetworkError"]
