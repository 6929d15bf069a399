"""What the capture extension leaves on modules and parameters during a backward pass.

For ``Linear``/``ConvNd`` layers a :class:`StructuredCapture` (the layer's inputs and the
backpropagated columns at its output) is stored on the module; for other parametrised
layers each trainable parameter receives a :class:`MaterializedCapture`. The network reads
and deletes both in BackPACK's ``extension_hook`` (:func:`pop_structured`,
:func:`pop_materialized`), and :func:`clear_captures` drops what a failed pass left.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

SAVEFIELD = "fisher_monitor_factors"


_CAPTURE_ATTRIBUTE = "_fisher_monitor_capture"


@dataclass
class StructuredCapture:
    """What a ``Linear``/``ConvNd`` layer leaves behind in the backward pass.

    Attributes:
        inputs: ``(N, T, I)`` layer inputs (unfolded for convolutions), no bias column.
        columns: ``(R, N, T, O)`` backpropagated loss-side columns at the output.
        positions: Whether the layer has positions (``T > 1`` or a weight-sharing layer).
    """

    inputs: Tensor
    columns: Tensor
    positions: bool


@dataclass
class MaterializedCapture:
    """BackPACK's per-parameter factors for a layer type without structured handling.

    Attributes:
        columns: ``(R, N, *shape)`` the loss-side columns pulled back to the parameter.
    """

    columns: Tensor


def store_structured(module: nn.Module, capture: Callable[[], StructuredCapture]) -> None:
    """Store ``capture()`` on ``module``, unless a parameter of the module already did."""
    if _CAPTURE_ATTRIBUTE not in module.__dict__:
        module.__dict__[_CAPTURE_ATTRIBUTE] = capture()


def clear_module_captures(module: nn.Module) -> None:
    """Drop the captures left on ``module`` and its own parameters (after a failed pass)."""
    module.__dict__.pop(_CAPTURE_ATTRIBUTE, None)
    for param in module.parameters(recurse=False):
        param.__dict__.pop(SAVEFIELD, None)


def pop_structured(module: nn.Module) -> StructuredCapture | None:
    """Remove and return the structured capture stored on ``module``, if any."""
    return module.__dict__.pop(_CAPTURE_ATTRIBUTE, None)


def pop_materialized(param: Tensor) -> MaterializedCapture | None:
    """Remove and return the materialised capture stored on ``param``, if any."""
    return param.__dict__.pop(SAVEFIELD, None)


def detach_capture(capture: StructuredCapture) -> StructuredCapture:
    """Detach the tensors of a capture from the autograd graph."""
    return StructuredCapture(capture.inputs.detach(), capture.columns.detach(), capture.positions)


__all__ = [
    "SAVEFIELD",
    "MaterializedCapture",
    "StructuredCapture",
    "clear_module_captures",
    "detach_capture",
    "pop_materialized",
    "pop_structured",
    "store_structured",
]
