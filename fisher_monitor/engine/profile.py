"""One sample's forward pass: every layer's shape, once per network and input shape.

The cost model (:mod:`~fisher_monitor.engine.cost`) and the memory model
(:mod:`~fisher_monitor.engine.memory`) both work from the :class:`NetworkProfile` recorded
here, before anything large is allocated: each measured layer's
:class:`~fisher_monitor.factors.LayerShape` (its factor form as the backend will represent
it, positions, input and output features, output elements, forward work) and the shape of
one sample's output, which gives the exact Fisher's columns per sample ``R_n``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fisher_monitor.backends import Backend
from fisher_monitor.backends.pass_context import call_network, forked_rng, full_precision
from fisher_monitor.batching import model_inputs, take_samples
from fisher_monitor.factors import LayerShape
from fisher_monitor.layers import LayerInfo


@dataclass(frozen=True)
class NetworkProfile:
    """What one sample's forward pass says about a measurement's work and memory.

    Attributes:
        layers: Every measured layer's shape, in the prepared network's order.
        itemsize: Bytes per number of the network.
        sample_shape: Shape of one sample's output (without the batch dimension).
    """

    layers: tuple[LayerShape, ...]
    itemsize: int
    sample_shape: tuple[int, ...] = (1,)

    @property
    def activations(self) -> int:
        """``Σ_b |a_b|``: the layers' output elements for one sample."""
        return sum(layer.elements for layer in self.layers)

    @property
    def largest_activation(self) -> int:
        """The largest layer output of one sample (elements)."""
        return max((layer.elements for layer in self.layers), default=1)

    @property
    def dimension(self) -> int:
        """``D``, the measured parameters of the whole network."""
        return sum(layer.dimension for layer in self.layers)

    @property
    def forward_flops(self) -> float:
        """Forward work of the measured layers for one sample."""
        return sum(layer.forward_flops for layer in self.layers)

    def fisher_columns(self, prepared: Backend) -> int:
        """``R_n``, the exact Fisher's square-root columns per sample (at least 1)."""
        return max(prepared.likelihood.fisher_columns(self.sample_shape), 1)


_PROFILES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def profile(prepared: Backend, inputs) -> NetworkProfile:
    """The profile of ``prepared`` for inputs shaped like ``inputs`` (cached per shape).

    Args:
        prepared: The prepared backend.
        inputs: The probe batch's inputs (only the first sample is run).
    """
    key = model_inputs(inputs).signature()
    cache = _PROFILES.setdefault(prepared, {})
    if key not in cache:
        cache[key] = _record(prepared, inputs)
    return cache[key]


def one_sample_forward(prepared: Backend, inputs, hooks: list[tuple[nn.Module, Any]]) -> Tensor:
    """The loss's input for the first sample of ``inputs``, with forward ``hooks``.

    Runs without gradients, on the monitor's own random stream and in full precision, and
    removes the hooks afterwards. A network whose forward pass fails on a single sample
    (a ``squeeze()`` that drops the batch dimension, a layer that needs two samples) is run
    on two samples and then on the whole batch; only the first sample's values are used.

    Args:
        prepared: The prepared backend.
        inputs: The probe batch's inputs (the first sample is used).
        hooks: ``(module, hook)`` pairs registered with ``register_forward_hook``; they
            receive the outputs of every sample run.

    Raises:
        Exception: The forward pass's own error on the whole batch, when every size fails.
    """
    arguments = model_inputs(inputs)
    batch = arguments.batch_size() or 1
    sizes = sorted({min(size, batch) for size in (1, 2, batch)})
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        for size in sizes:
            try:
                output = _forward(prepared, take_samples(arguments, size, batch))
            except Exception as error:
                if size == sizes[-1] or isinstance(error, (torch.OutOfMemoryError, MemoryError)):
                    raise
                continue
            return output[:1] if isinstance(output, Tensor) else output
    finally:
        for handle in handles:
            handle.remove()
    raise AssertionError("unreachable")  # the loop returns or raises


def _forward(prepared: Backend, arguments) -> Tensor:
    notes: list[str] = []
    with (
        torch.no_grad(),
        forked_rng(prepared.device, 0),
        full_precision(prepared.device, notes),
    ):
        return call_network(prepared.network, arguments, prepared.outputs)


def _record(prepared: Backend, inputs) -> NetworkProfile:
    shapes: dict[str, LayerShape] = {}
    hooks = []
    for info, module in _layer_modules(prepared):

        def record(module, _inputs, output, info=info):
            if info.name not in shapes:
                shapes[info.name] = layer_shape(prepared, info, module, output)

        hooks.append((module, record))
    output = one_sample_forward(prepared, inputs, hooks)
    fallback = {shape.name: shape for shape in parameter_profile(prepared).layers}
    # a layer the forward pass never reached gets no factors; count it from its parameters
    ordered = tuple(shapes.get(info.name, fallback[info.name]) for info, _ in prepared.layers)
    sample_shape = tuple(output.shape[1:]) if isinstance(output, Tensor) else (1,)
    return NetworkProfile(ordered, _itemsize(prepared), sample_shape)


def _layer_modules(prepared: Backend) -> list[tuple[LayerInfo, nn.Module]]:
    """The prepared network's module of each layer (after a graph conversion, the new one)."""
    found: dict[str, tuple[LayerInfo, nn.Module]] = {}
    for module in prepared.network.modules():
        for parameter in module.parameters(recurse=False):
            info = prepared.layer_of_copy_param.get(id(parameter))
            if info is not None:
                found.setdefault(info.name, (info, module))
                break
    return list(found.values())


def layer_shape(prepared: Backend, info: LayerInfo, module: nn.Module, output) -> LayerShape:
    """A layer's shape from its module and its output for one sample.

    A layer with a weight matrix (``Linear``, convolutions, embeddings) applies it at
    ``T = |output| / O`` positions; its forward costs ``2·D·T``, anything else ``2·|output|``.
    """
    elements = output[:1].numel() if isinstance(output, Tensor) else info.dimension
    weight = getattr(module, "weight", None)
    weighted = isinstance(weight, Tensor) and weight.dim() >= 2
    outputs = int(weight.shape[0]) if weighted else info.dimension
    if isinstance(module, nn.Embedding):  # a lookup: O = embedding_dim, I = num_embeddings
        outputs = module.embedding_dim
    positions = max(1, elements // max(outputs, 1)) if weighted else 1
    flops = 2.0 * info.dimension * positions if weighted else 2.0 * elements
    if isinstance(module, nn.Embedding):
        flops = float(elements)
    return LayerShape(
        name=info.name,
        form=prepared.factor_form(module, output),
        positions=positions,
        inputs=max(1, info.dimension // max(outputs, 1)),
        outputs=outputs,
        dimension=info.dimension,
        elements=elements,
        forward_flops=flops,
    )


def parameter_profile(prepared: Backend) -> NetworkProfile:
    """A profile from parameter shapes alone (no forward pass), with one position per layer.

    Exact for ``Linear`` layers on ``(N, I)`` inputs; a convolution counts one position.
    """
    shapes = []
    for info, source in prepared.layers:
        module = prepared.copy_of(source)
        weight = getattr(module, "weight", None)
        outputs = int(weight.shape[0]) if isinstance(weight, Tensor) and weight.dim() else 1
        probe = torch.empty(1, outputs) if isinstance(module, nn.Linear) else None
        form = prepared.factor_form(module, probe) if probe is not None else "materialised"
        if form == "materialised" and isinstance(weight, Tensor) and weight.dim() >= 2:
            form = prepared.factor_form(module, torch.empty(1, outputs, 1))
        shapes.append(
            LayerShape(
                name=info.name,
                form=form,
                positions=1,
                inputs=max(1, info.dimension // max(outputs, 1)),
                outputs=outputs if form != "materialised" else max(outputs, 1),
                dimension=info.dimension,
                elements=outputs,
                forward_flops=2.0 * info.dimension,
            )
        )
    return NetworkProfile(tuple(shapes), _itemsize(prepared))


def _itemsize(prepared: Backend) -> int:
    return torch.empty(0, dtype=prepared.parameter_dtype).element_size()


__all__ = [
    "NetworkProfile",
    "layer_shape",
    "one_sample_forward",
    "parameter_profile",
    "profile",
]
