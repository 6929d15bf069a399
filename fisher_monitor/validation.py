"""Checks of ``measure()``'s and ``Measurer``'s own arguments, before any work.

The settings shared with the callback are checked by
:meth:`fisher_monitor.settings.MeasureSettings.create`; these are the arguments only the
functional API takes. Every message names the argument, shows the value with ``!r`` and
says what is allowed, instead of the error PyTorch would raise deep inside a measurement
(``'int' object has no attribute 'device'``, ``"linalg_svd_cpu" not implemented for
'Half'``).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from fisher_monitor.settings import is_whole_number

#: Floating-point types the curvature arithmetic can run in.
COMPUTE_DTYPES = (torch.float64, torch.float32)


def check_generator(generator: Any) -> torch.Generator | None:
    """``None`` or a ``torch.Generator``.

    Raises:
        TypeError: For anything else (a seed is not a generator).
    """
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    hint = (
        f" To seed it, pass generator=torch.Generator().manual_seed({generator!r})."
        if isinstance(generator, int) and not isinstance(generator, bool)
        else ""
    )
    raise TypeError(
        f"Invalid generator: {generator!r}. Pass a torch.Generator (it seeds label sampling "
        f"and dropout masks) or None for a fresh seed.{hint}"
    )


def check_dtype(dtype: Any) -> torch.dtype:
    """The type of the curvature arithmetic: ``torch.float64`` or ``torch.float32``.

    Raises:
        TypeError: For a value that is not a ``torch.dtype`` (e.g. the string
            ``"float64"``).
        ValueError: For an integer, complex or half-precision type: the eigen- and
            singular-value decompositions need single or double precision.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"Invalid dtype: {dtype!r}. Pass torch.float64 (the default) or torch.float32, "
            "not a string."
        )
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"Invalid dtype: {dtype}. The curvature arithmetic (eigen- and singular-value "
            "decompositions of the damped matrices) needs torch.float64 (the default) or "
            "torch.float32. The network itself may be in float16 or bfloat16: it is "
            "measured through float32 copies of its parameters whatever this dtype is."
        )
    return dtype


def check_model(model: Any) -> None:
    """A ``torch.nn.Module`` whose parameters can be measured: real floating point.

    Raises:
        TypeError: For something that is not a module.
        ValueError: For a model whose parameters are integers (none can be trained), or
            a trainable complex parameter, naming the parameter and its type.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    parameters = list(model.named_parameters())
    for name, parameter in parameters:
        if parameter.requires_grad and parameter.is_complex():
            raise ValueError(
                f"Invalid model: parameter {name!r} is {parameter.dtype}. The Fisher is "
                "measured over real parameters: measure a real-valued network."
            )
    integer = [(n, p) for n, p in parameters if not p.is_floating_point() and not p.is_complex()]
    if integer and not any(p.requires_grad and p.is_floating_point() for _, p in parameters):
        name, parameter = integer[0]
        raise ValueError(
            f"Invalid model: no trainable floating-point parameter ({name!r} is "
            f"{parameter.dtype}). The Fisher is defined over trained, floating-point "
            "parameters: measure the floating-point model you train (e.g. model.float() "
            "before quantising it)."
        )


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


def format_bytes(size: float) -> str:
    """A size for messages: ``"1 byte"``, ``"812 bytes"``, ``"3.2 KiB"``, ``"1.5 GiB"``."""
    if size < 1024:
        count = int(size)
        return f"{count} byte" if count == 1 else f"{count} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{size:,.1f} {unit}"


def format_steps(steps: float) -> str:
    """A number of training steps for messages: ``"0.42"``, ``"12,345"``, ``"3.2e+07"``."""
    if steps < 10:  # two significant digits (a fraction of a step is not "0")
        return f"{steps:.2g}"
    return f"{steps:,.0f}" if steps < 1e6 else f"{steps:.1e}"


def check_memory_budget(value: Any) -> int | None:
    """Bytes as an int: from ``None``, an int ≥ 1, or a size such as ``"1GB"`` or ``"512MiB"``.

    Decimal units (``kB``, ``MB``, ``GB``, ``TB``) are powers of 1000, binary units
    (``KiB``, ``MiB``, ``GiB``, ``TiB``) powers of 1024; case does not matter.

    Raises:
        ValueError: For anything else, including a size too large to be a number of bytes.
    """
    if value is None:
        return None
    if is_whole_number(value):
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match and match["unit"].lower() in _UNITS:
            number = float(match["number"]) * _UNITS[match["unit"].lower()]
            if not math.isfinite(number):
                raise ValueError(
                    f"Invalid memory_budget: {value!r} is too large to be a number of bytes. "
                    "Use a size such as '1GB' or '512MiB', an int ≥ 1, or None for half the "
                    "available memory."
                )
            size = int(number)
            if size >= 1:
                return size
    raise ValueError(
        f"Invalid memory_budget: {value!r}. Use a number of bytes (an int ≥ 1), a size such "
        "as '1GB' or '512MiB', or None for half the available memory."
    )


def format_names(names: list[str], shown: int = 5) -> str:
    """Names for messages: the first ``shown``, then ``"and N more"``."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def check_solve_budget(value: Any) -> float | None:
    """Training steps the exact-Fisher solves may cost: ``None``, or a number ≥ 0 (``inf``).

    Raises:
        ValueError: For anything else.
    """
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond floats
            number = math.inf if value > 0 else -math.inf
        if number >= 0:  # NaN fails this too
            return number
    raise ValueError(
        f"Invalid solve_budget: {value!r}. Use a number of training steps ≥ 0 (0 never runs "
        "the exact-Fisher solves, float('inf') always runs them), or None for the default "
        "of 40,000."
    )


__all__ = [
    "COMPUTE_DTYPES",
    "check_dtype",
    "check_generator",
    "check_memory_budget",
    "check_solve_budget",
    "check_model",
    "format_bytes",
    "format_names",
    "format_steps",
]
