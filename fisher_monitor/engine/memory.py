"""The memory model of a measurement: estimate the peak before allocating, and fit the probe.

The estimate is computed from shapes only, before anything large is allocated; a probe
batch whose estimate exceeds the budget is cut to the largest prefix that fits (with a
note), and a measurement that still runs out of memory is retried on half the samples.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fisher_monitor.batching import take_samples
from fisher_monitor.curvature.backends import Backend
from fisher_monitor.curvature.passes import forked_rng, full_precision
from fisher_monitor.settings import FisherType, MeasureSettings, Structure


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


def output_columns(prepared: Backend, settings: MeasureSettings, inputs) -> int:
    """Loss-side columns per sample (``R_n``, plus one for the Monte-Carlo Fisher)."""
    if settings.fisher is FisherType.MC:
        return settings.mc_samples + 1
    first = take_samples(inputs, 1)
    args = first if isinstance(first, (tuple, list)) else (first,)
    notes: list[str] = []
    with torch.no_grad(), forked_rng(prepared.device, 0), full_precision(prepared.device, notes):
        output = prepared.network(*args)  # one sample, only for its shape
    shape = tuple(output.shape[1:]) if isinstance(output, Tensor) else (1,)
    return max(prepared.likelihood.fisher_columns(shape), 1)


def estimate_peak_bytes(
    prepared: Backend, settings: MeasureSettings, size: int, columns_per_sample: int
) -> int:
    """Estimated peak memory of one measurement with ``size`` probe samples.

    Per layer: its factors (outer-product factors for ``Linear`` layers with BackPACK,
    materialised ``U`` and ``V`` otherwise, in the network's type and in float64), the
    Gram or dense matrices of the ``block`` structure (``R × R`` with
    ``R = size · columns_per_sample``, or ``D × D``, four of them), the Kronecker
    factors and the diagonals; the largest layer counts, as layers are processed one at
    a time. The ``torch.func`` backend holds every layer's factors at once.
    """
    columns = size * columns_per_sample
    functorch = prepared.backend == "functorch"
    largest, held = 0, 0
    for info, module in prepared.layers:
        dim = info.dimension
        weight = getattr(module, "weight", None)
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else (dim, 1)
        out_features, in_features = shape[0], dim // max(shape[0], 1)
        if not functorch and isinstance(module, nn.Linear):
            factors = 8 * (columns * out_features + size * (in_features + out_features))
        else:
            factors = 12 * (size + columns) * dim
        needed = factors + 6 * 8 * dim
        if Structure.BLOCK in settings.structures or Structure.KRON in settings.structures:
            side = columns if dim > max(size, columns) else dim
            needed += 4 * 8 * side * side
        if Structure.KRON in settings.structures:
            needed += 3 * 8 * (out_features**2 + in_features**2)
        largest = max(largest, needed)
        if functorch:
            held += 4 * size * columns_per_sample * dim
    return largest + held


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
    "available_memory",
    "estimate_peak_bytes",
    "fitting_batch_size",
    "is_out_of_memory",
    "output_columns",
]
