"""Checks of ``measure()``'s and ``Measurer``'s own arguments, before any work.

The settings shared with the callback are checked by
:meth:`fisher_monitor.settings.MeasureSettings.create`; these are the arguments only the
functional API takes. Every message names the argument, shows the value with ``!r`` and
says what is allowed, instead of the error PyTorch would raise deep inside a measurement
(``'int' object has no attribute 'device'``, ``"linalg_svd_cpu" not implemented for
'Half'``).
"""

from __future__ import annotations

from typing import Any

import torch

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


def check_memory_budget(value: Any) -> int | None:
    """:func:`fisher_monitor.engine.memory.check_memory_budget`, with sizes too large refused.

    A size such as ``"1111…1GB"`` parses to an infinite float; it is refused with the
    argument's message instead of an ``OverflowError``.
    """
    from fisher_monitor.engine.memory import check_memory_budget as parse

    try:
        return parse(value)
    except OverflowError:
        raise ValueError(
            f"Invalid memory_budget: {value!r} is too large to be a number of bytes. Use a "
            "size such as '1GB' or '512MiB', an int ≥ 1, or None for half the available memory."
        ) from None


__all__ = [
    "COMPUTE_DTYPES",
    "check_dtype",
    "check_generator",
    "check_memory_budget",
    "check_model",
]
