"""The memory model of a measurement: estimate the peak before allocating, and fit the probe.

The estimate is computed from shapes only, before anything large is allocated: one
forward pass of a single sample records every module's output size and every layer's
input and output shapes (:class:`NetworkProfile`). A probe batch whose estimate exceeds
the budget is cut to the largest prefix that fits (with a note), and a measurement that
still runs out of memory is retried on half the samples.

What the estimate counts (``N`` probe samples, ``R_n`` loss-side columns per sample,
``R = R_n·N``, ``s`` bytes per number of the network, 8 for the float64 curvature):

- the forward pass's saved activations, a few ``N · |a_b| · s`` per layer ``b`` (its
  output ``a_b``, and those of the normalisation, activation and pooling modules that
  follow it);
- BackPACK's backward pass of the columns, which holds a few ``R_n·N·|a_b|·s`` tensors
  around the largest activation (the columns at a module's output and input, and one held
  at a residual branch);
- the work of one layer at a time, the largest counting (layers are processed in turn):
  the captured layer inputs and float64 output-side factors; for convolutions the
  position-pair or chunked materialised form (never the whole ``R × D`` matrix ``V``
  unless it is small, see :class:`~fisher_monitor.curvature.factors.WeightSharingFactors`);
  for the ``block`` structure the ``R × R`` Gram matrices and their factorisations, or
  the ``D × D`` blocks of a small layer; for ``kron`` the factors ``A`` and ``G`` and,
  with weight sharing, the per-sample gradients;
- the diagonals and mean gradients of every layer, kept until the end of the pass;
- the ``torch.func`` backend instead holds every layer's ``(N, R_n, D_b)`` pull-backs at
  once, and runs ``vmap`` over chunks of samples.

The constants were calibrated against the measured peak (resident-set high-water mark)
of an MLP, a small CNN and torchvision's ResNet-18 on CPU; the estimate is meant to be
within a small factor of the truth, erring high (see ``tests/test_memory.py``).
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fisher_monitor.batching import take_samples
from fisher_monitor.curvature.backends import Backend
from fisher_monitor.curvature.capture import supports_structured
from fisher_monitor.curvature.factors import (
    CHUNK_BYTES,
    weight_sharing_costs,
    weight_sharing_diagonal_costs,
)
from fisher_monitor.curvature.passes import forked_rng, full_precision
from fisher_monitor.settings import FisherType, MeasureSettings, Structure, is_whole_number

#: Bytes per number of the curvature arithmetic (float64).
CURVATURE_BYTES = 8
#: Saved activations per layer output (the layer's, a normalisation's, an activation's).
ACTIVATION_COPIES = 3
#: Column tensors of the BackPACK backward pass alive at once, in units of the largest.
BACKPROP_COPIES = 4
#: ``R × R`` matrices alive in the block structure's low-rank path (Grams, factorisations).
GRAM_COPIES = 8
#: ``D × D`` matrices alive in the block structure's dense path.
DENSE_COPIES = 6
#: Chunks of the weight-sharing factors (see :mod:`fisher_monitor.curvature.factors`).
DIAGONAL_CHUNK_BYTES = 2**23
PAIR_CHUNK_BYTES = 2**23
#: Samples per ``vmap`` chunk of the torch.func backend (its default).
FUNCTORCH_CHUNK = 16


@dataclass(frozen=True)
class LayerShape:
    """Shapes of one measured layer, per sample.

    Attributes:
        name: The layer's name.
        form: ``"outer"`` (``Linear`` on BackPACK, one position), ``"shared"``
            (convolutions and sequence ``Linear`` layers on BackPACK) or
            ``"materialised"`` (any other layer, and every layer on ``torch.func``).
        positions: ``T``, output positions sharing the weight.
        inputs: ``I``, input features with the bias column.
        outputs: ``O``, output features.
        dimension: ``D``, trainable parameters.
        elements: The layer's output elements for one sample.
    """

    name: str
    form: str
    positions: int
    inputs: int
    outputs: int
    dimension: int
    elements: int


@dataclass(frozen=True)
class NetworkProfile:
    """What one sample's forward pass says about the memory of a measurement.

    Attributes:
        layers: Every measured layer's shapes.
        itemsize: Bytes per number of the network.
    """

    layers: tuple[LayerShape, ...]
    itemsize: int

    @property
    def activations(self) -> int:
        """``Σ_b |a_b|``: the layers' output elements for one sample."""
        return sum(layer.elements for layer in self.layers)

    @property
    def largest_activation(self) -> int:
        """The largest layer output of one sample (elements)."""
        return max((layer.elements for layer in self.layers), default=1)


#: The last profile recorded per prepared network (for callers that pass a plain ``R_n``).
_PROFILES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ColumnCount(int):
    """``R_n`` (loss-side columns per sample) with the profile of the pass that counted it.

    Behaves as the integer; :func:`estimate_peak_bytes` reads :attr:`profile` from it.
    """

    profile: NetworkProfile | None = None

    def __new__(cls, value: int, profile: NetworkProfile | None = None):  # noqa: D102
        count = super().__new__(cls, value)
        count.profile = profile
        return count


def available_memory(device: torch.device) -> int | None:
    """Half of the memory available now (CUDA: 80% of the free device memory).

    On Linux the host memory comes from ``/proc/meminfo``; elsewhere from ``psutil`` when
    it is installed; ``None`` (no limit) when neither can tell.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.8 * free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available) // 2


def _layer_modules(prepared: Backend) -> dict[int, tuple[str, nn.Module]]:
    """The prepared network's module of each layer, by ``id``."""
    found: dict[int, tuple[str, nn.Module]] = {}
    for module in prepared.network.modules():
        for parameter in module.parameters(recurse=False):
            info = prepared.layer_of_copy_param.get(id(parameter))
            if info is not None:
                found[id(module)] = (info.name, module)
                break
    return found


def _layer_shape(prepared: Backend, name: str, module: nn.Module, output: Tensor) -> LayerShape:
    dimension = next(info.dimension for info, _ in prepared.layers if info.name == name)
    elements = output[:1].numel() if isinstance(output, Tensor) else dimension
    on_backpack = prepared.backend == "backpack"
    bias = getattr(module, "bias", None)
    bias_column = int(isinstance(bias, Tensor) and bias.requires_grad)
    if on_backpack and supports_structured(module) and isinstance(output, Tensor):
        if isinstance(module, nn.Linear):
            outputs = module.out_features
            positions = max(output.numel() // max(outputs, 1), 1)
            inputs = module.in_features + bias_column
            form = "outer" if positions == 1 and output.dim() == 2 else "shared"
        else:
            outputs = module.out_channels
            positions = max(output[0, 0].numel(), 1)
            kernel = 1
            for size in module.kernel_size:
                kernel *= int(size)
            inputs = module.in_channels // module.groups * kernel + bias_column
            form = "shared"
        return LayerShape(name, form, positions, inputs, outputs, dimension, elements)
    return LayerShape(name, "materialised", 1, dimension, 1, dimension, elements)


def profile_network(prepared: Backend, inputs) -> NetworkProfile:
    """Run one sample forward and record the shapes the memory model needs."""
    return _profile_pass(prepared, inputs)[0]


def one_sample_forward(prepared: Backend, inputs, hooks: list[tuple[nn.Module, Any]]) -> object:
    """The network's output for the first sample of ``inputs``, with forward ``hooks``.

    Runs without gradients, on the monitor's own random stream and in full precision, and
    removes the hooks afterwards (the cost and memory models' one-sample profiles).

    Args:
        prepared: The prepared backend.
        inputs: The probe batch's inputs (only the first sample is used).
        hooks: ``(module, hook)`` pairs registered with ``register_forward_hook``.
    """
    first = take_samples(inputs, 1)
    args = first if isinstance(first, (tuple, list)) else (first,)
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    notes: list[str] = []
    try:
        with (
            torch.no_grad(),
            forked_rng(prepared.device, 0),
            full_precision(prepared.device, notes),
        ):
            return prepared.network(*args)
    finally:
        for handle in handles:
            handle.remove()


def _profile_pass(prepared: Backend, inputs) -> tuple[NetworkProfile, object]:
    """The profile and the network's output for one sample."""
    layers: dict[str, LayerShape] = {}
    hooks = []
    for name, module in _layer_modules(prepared).values():

        def record(module, _inputs, output, name=name):
            if name not in layers:
                layers[name] = _layer_shape(prepared, name, module, output)

        hooks.append((module, record))
    output = one_sample_forward(prepared, inputs, hooks)
    fallback = {layer.name: layer for layer in _fallback_profile(prepared).layers}
    # a layer the forward pass never reached gets no factors; count it from its parameters
    ordered = tuple(layers.get(info.name, fallback[info.name]) for info, _ in prepared.layers)
    itemsize = torch.empty(0, dtype=prepared.parameter_dtype).element_size()
    return NetworkProfile(ordered, itemsize), output


def output_columns(prepared: Backend, settings: MeasureSettings, inputs) -> ColumnCount:
    """Loss-side columns per sample (``R_n``, plus one for the Monte-Carlo Fisher).

    The count carries the :class:`NetworkProfile` of the one-sample forward pass it came
    from, for :func:`estimate_peak_bytes`.
    """
    profile, output = _profile_pass(prepared, inputs)
    _PROFILES[prepared] = profile
    if settings.fisher is FisherType.MC:
        return ColumnCount(settings.mc_samples + 1, profile)
    shape = tuple(output.shape[1:]) if isinstance(output, Tensor) else (1,)
    return ColumnCount(max(prepared.likelihood.fisher_columns(shape), 1), profile)


def _fallback_profile(prepared: Backend) -> NetworkProfile:
    """A profile from parameter shapes alone (when no forward pass was recorded).

    Exact for ``Linear`` layers on ``(N, I)`` inputs; a convolution counts one position.
    """
    layers = []
    on_backpack = prepared.backend == "backpack"
    for info, module in prepared.layers:
        weight = getattr(module, "weight", None)
        if on_backpack and isinstance(module, nn.Linear):
            outputs = module.out_features
            inputs = info.dimension // outputs
            layers.append(
                LayerShape(info.name, "outer", 1, inputs, outputs, info.dimension, outputs)
            )
        elif on_backpack and supports_structured(module) and isinstance(weight, Tensor):
            outputs = weight.shape[0]
            inputs = info.dimension // outputs
            layers.append(
                LayerShape(info.name, "shared", 1, inputs, outputs, info.dimension, outputs)
            )
        else:
            outputs = weight.shape[0] if isinstance(weight, Tensor) and weight.dim() else 1
            layers.append(
                LayerShape(info.name, "materialised", 1, info.dimension, 1, info.dimension, outputs)
            )
    itemsize = torch.empty(0, dtype=prepared.parameter_dtype).element_size()
    return NetworkProfile(tuple(layers), itemsize)


def _layer_bytes(
    layer: LayerShape, settings: MeasureSettings, size: int, columns_per_sample: int, s: int
) -> int:
    """Peak bytes of one layer's factors and structures (one layer is alive at a time)."""
    d = CURVATURE_BYTES
    n, rn = size, columns_per_sample
    r = n * rn
    t, i, o, dim = layer.positions, layer.inputs, layer.outputs, layer.dimension
    structures = settings.structures
    block = Structure.BLOCK in structures
    kron = Structure.KRON in structures
    dense = dim <= max(n, r)
    total = 4 * dim * d  # diagonals, mean gradient and their temporaries
    if layer.form == "materialised":
        total += rn * n * dim * s * 2  # BackPACK's parameter Jacobian columns and their copy
        total += n * dim * d  # per-sample gradients in float64
        if block:
            total += (r + n) * dim * d  # the factors cast to float64
            total += DENSE_COPIES * dim * dim * d if dense else GRAM_COPIES * r * r * d
        return total
    # captured inputs (unfolded, then with the bias column) and float64 output-side factors
    # (the cast columns, a contiguous copy, and the per-sample output gradients)
    total += 2 * n * t * i * s + (2 * rn + 1) * n * t * o * d
    if layer.form == "outer":
        total += (n * i + r * o) * d
        if block and dense:
            total += DENSE_COPIES * dim * dim * d + (r + n) * dim * d
        elif block:
            total += GRAM_COPIES * r * r * d
        if kron:
            total += 3 * (i * i + o * o) * d
        return total
    # the decisions of WeightSharingFactors (see its cost functions)
    if _diagonal_uses_pairs(rn, n, t, o, i, s):
        total += d * n * t * (t + 1) // 2 * (o + i) + o * i * d
    else:
        total += DIAGONAL_CHUNK_BYTES + o * i * d
    if block and dense:
        total += (r + n) * dim * d + DENSE_COPIES * dim * dim * d
    elif block:
        if _gram_uses_pairs(rn, n, t, o, i):
            total += 2 * d * (n * t) ** 2 + 2 * rn * n * t * o * d + 2 * PAIR_CHUNK_BYTES
        else:  # chunks of the columns, in the network's type and in float64
            total += min(r * dim * d, CHUNK_BYTES) * (d + s) // d
        total += GRAM_COPIES * r * r * d
    if kron:
        total += 3 * (i * i + o * o) * d + (n * t * i + r * t * o) * d
        if t > 1:
            total += 3 * n * dim * d  # per-sample gradients, rotated and residual copies
    return total


def _gram_uses_pairs(rn: int, n: int, t: int, o: int, i: int) -> bool:
    materialised, pairs = weight_sharing_costs(rn, rn, n, t, o, i)
    return pairs < materialised


def _diagonal_uses_pairs(rn: int, n: int, t: int, o: int, i: int, s: int) -> bool:
    if t == 1:
        return True
    materialised, pairs = weight_sharing_diagonal_costs(rn, n, t, o, i)
    return pairs * (8 // s) < materialised and 8 * n * t * (t + 1) // 2 * (o + i) <= CHUNK_BYTES


def estimate_peak_bytes(
    prepared: Backend, settings: MeasureSettings, size: int, columns_per_sample: int
) -> int:
    """Estimated peak memory (bytes) of one measurement with ``size`` probe samples.

    Args:
        prepared: The prepared backend.
        settings: The measurement's settings.
        size: Probe samples ``N``.
        columns_per_sample: ``R_n``, as :func:`output_columns` returns it. With a plain
            integer, the shapes of the last :func:`output_columns` call on ``prepared``
            are used, or else the parameters' shapes alone.

    Returns:
        The estimate (see the module docstring for what it counts).
    """
    profile = (
        getattr(columns_per_sample, "profile", None)
        or _PROFILES.get(prepared)
        or _fallback_profile(prepared)
    )
    s = profile.itemsize
    n, rn = size, int(columns_per_sample)
    total_dimension = sum(layer.dimension for layer in profile.layers)
    peak = ACTIVATION_COPIES * n * profile.activations * s  # saved for the backward pass
    peak += 3 * CURVATURE_BYTES * total_dimension  # diagonals and gradients of every layer
    largest_layer = max(
        (_layer_bytes(layer, settings, n, rn, s) for layer in profile.layers), default=0
    )
    if prepared.backend == "functorch":
        peak += 2 * n * rn * total_dimension * s  # every layer's pull-backs, and their cat
        # vmap over a chunk of samples and their columns
        peak += ACTIVATION_COPIES * min(n, FUNCTORCH_CHUNK) * (rn + 1) * profile.activations * s
    else:
        peak += BACKPROP_COPIES * rn * n * profile.largest_activation * s
    return int(peak + largest_layer)


def fitting_batch_size(
    prepared: Backend, settings: MeasureSettings, size: int, columns: int, budget: int
) -> int:
    """The largest probe size up to ``size`` whose estimated peak fits ``budget``.

    Raises:
        MemoryError: If not even one sample fits, with what to change.
    """

    def estimate(count: int) -> int:
        return estimate_peak_bytes(prepared, settings, count, columns)

    if estimate(size) <= budget:
        return size
    low, high = 1, size
    while low < high:
        middle = (low + high + 1) // 2
        if estimate(middle) <= budget:
            low = middle
        else:
            high = middle - 1
    if estimate(low) > budget:
        raise MemoryError(
            f"Even one probe sample needs an estimated {estimate(1) / 2**30:.1f} GiB, above the "
            f"memory budget of {budget / 2**30:.1f} GiB. Measure fewer structures (e.g. "
            "structures=('diag',)), fisher='mc', or a sub-network."
        )
    return low


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception is an out-of-memory failure (CUDA or host)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


__all__ = [
    "ColumnCount",
    "LayerShape",
    "NetworkProfile",
    "available_memory",
    "estimate_peak_bytes",
    "fitting_batch_size",
    "is_out_of_memory",
    "one_sample_forward",
    "output_columns",
    "profile_network",
]


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(?P<number>\d+(\.\d+)?)\s*(?P<unit>[a-zA-Z]*)\s*$")


def check_memory_budget(value: Any) -> int | None:
    """Bytes as an int: from ``None``, an int ≥ 1, or a size such as ``"1GB"`` or ``"512MiB"``.

    Decimal units (``kB``, ``MB``, ``GB``, ``TB``) are powers of 1000, binary units
    (``KiB``, ``MiB``, ``GiB``, ``TiB``) powers of 1024; case does not matter.
    """
    if value is None:
        return None
    if is_whole_number(value):
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match and match["unit"].lower() in _UNITS:
            size = int(float(match["number"]) * _UNITS[match["unit"].lower()])
            if size >= 1:
                return size
    raise ValueError(
        f"Invalid memory_budget: {value!r}. Use a number of bytes (an int ≥ 1), a size such "
        "as '1GB' or '512MiB', or None for half the available memory."
    )
