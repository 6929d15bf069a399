"""The memory model of a measurement: estimate the peak before allocating, and fit the probe.

The estimate is computed from shapes only, before anything large is allocated, from the
one-sample profile of :mod:`~fisher_monitor.engine.profile`. A probe batch whose estimate exceeds
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
  the layer's factors as their representation holds them
  (:meth:`~fisher_monitor.factors.LayerFactors.factor_bytes`), plus what each structure
  holds on it (:meth:`~fisher_monitor.structures.base.Structure.peak_bytes`: the ``R × R``
  Gram matrices of ``block`` or its ``D × D`` blocks, the factors of ``kron``);
- the diagonals and mean gradients of every layer, kept until the end of the pass;
- the pass itself, as the backend says (:meth:`~fisher_monitor.backends.base.Backend.
  pass_bytes`): BackPACK's columns around the largest activation, or ``torch.func``'s
  pull-backs of every layer.

The constants were calibrated against the measured peak (resident-set high-water mark)
of an MLP, a small CNN and torchvision's ResNet-18 on CPU; the estimate is meant to be
within a small factor of the truth, erring high (see ``tests/test_memory.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fisher_monitor.backends import Backend
from fisher_monitor.engine.profile import NetworkProfile
from fisher_monitor.factors import CURVATURE_BYTES, PassSize, form_of
from fisher_monitor.structures import Structure
from fisher_monitor.validation import format_bytes

#: Saved activations per layer output (the layer's, a normalisation's, an activation's).
ACTIVATION_COPIES = 3


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


def estimate_peak_bytes(
    prepared: Backend, structures: Sequence[Structure], profile: NetworkProfile, size: PassSize
) -> int:
    """Estimated peak memory (bytes) of one measurement.

    Args:
        prepared: The prepared backend.
        structures: The structures the measurement runs.
        profile: The network's one-sample profile.
        size: The pass: probe samples ``N`` and Fisher columns per sample.

    Returns:
        The estimate (see the module docstring for what it counts).
    """
    s, n = profile.itemsize, size.samples
    peak = ACTIVATION_COPIES * n * profile.activations * s  # saved for the backward pass
    peak += 3 * CURVATURE_BYTES * profile.dimension  # diagonals and gradients of every layer
    peak += prepared.pass_bytes(
        size, profile.activations, profile.largest_activation, profile.dimension
    )
    largest_layer = max(
        (
            form_of(shape).factor_bytes(shape, size)
            + sum(structure.peak_bytes(shape, size) for structure in structures)
            for shape in profile.layers
        ),
        default=0,
    )
    return int(peak + largest_layer)


def fitting_batch_size(
    estimate, size: int, budget: int, structures: Sequence[str] = (), fisher: str = "exact"
) -> int:
    """The largest probe size up to ``size`` whose estimated peak fits ``budget``.

    Args:
        estimate: ``estimate(samples)``, the estimated peak bytes for a probe of that size.
        size: The probe's size.
        budget: Bytes allowed.
        structures: The structures measured (the message suggests only what would change).
        fisher: ``"exact"`` or ``"mc"`` (likewise).

    Raises:
        MemoryError: If not even one sample fits, with what to change.
    """
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
        fixes = [f"raise memory_budget (now {format_bytes(budget)})"]
        if any(name != "diag" for name in structures):
            fixes.append("measure fewer structures (structures=('diag',))")
        if fisher != "mc":
            fixes.append("use fisher='mc' (one sampled label per sample)")
        fixes.append("measure a sub-network (measure(model.head, ...))")
        raise MemoryError(
            f"Even one probe sample needs an estimated {format_bytes(estimate(1))}, above the "
            f"memory budget of {format_bytes(budget)}. To measure it, "
            f"{', '.join(fixes[:-1])} or {fixes[-1]}."
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
]
