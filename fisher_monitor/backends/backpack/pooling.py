"""Adaptive average pooling for BackPACK's square-root backpropagation.

Adaptive average pooling (``AdaptiveAvgPool1d/2d/3d``, e.g. the global pooling before a
ResNet's classifier) has no ``SqrtGGN`` extension in BackPACK; the capture extension
(:mod:`~fisher_monitor.backends.backpack.extension`) registers the one here, whose
transposed Jacobian is the exact separable averaging operator, in the type of the
backpropagated columns.
"""

from __future__ import annotations

import torch
from backpack.core.derivatives.basederivatives import BaseDerivatives
from backpack.extensions.secondorder.sqrt_ggn.base import SqrtGGNBaseModule
from torch import Tensor, nn


def pooling_matrix(size_in: int, size_out: int, dtype: torch.dtype, device) -> Tensor:
    """The ``(size_out, size_in)`` matrix of adaptive average pooling along one axis.

    Output position ``i`` averages the inputs ``⌊i·L/l⌋ … ⌈(i+1)·L/l⌉ − 1`` (PyTorch's
    definition, for any ``L = size_in`` and ``l = size_out``, divisible or not).
    """
    matrix = torch.zeros(size_out, size_in, dtype=dtype, device=device)
    for i in range(size_out):
        start = (i * size_in) // size_out
        stop = -(-((i + 1) * size_in) // size_out)
        matrix[i, start:stop] = 1.0 / (stop - start)
    return matrix


class AdaptiveAvgPoolDerivatives(BaseDerivatives):
    """Jacobians of ``AdaptiveAvgPool{1,2,3}d`` on batched ``(N, C, *spatial)`` inputs.

    Adaptive average pooling is linear and separable: along each spatial axis it applies
    :func:`pooling_matrix` ``P_k``, so ``Jᵀ M = M ×_1 P_1ᵀ ×_2 P_2ᵀ …`` exactly (for a
    1 × 1 output: the column spread evenly over the ``H·W`` positions). The matrices take
    the type and device of the backpropagated columns, so float64 networks work under a
    float32 default dtype.

    Args:
        dimensions: Number of spatial axes (1, 2 or 3).
    """

    def __init__(self, dimensions: int):
        self.dimensions = dimensions

    def hessian_is_zero(self, module: nn.Module) -> bool:  # noqa: D102 - linear map
        return True

    def _matrices(self, module: nn.Module, like: Tensor) -> list[Tensor]:
        spatial_in = module.input0.shape[-self.dimensions :]
        spatial_out = module.output.shape[-self.dimensions :]
        if module.input0.dim() != self.dimensions + 2:
            raise NotImplementedError(
                f"{type(module).__name__} is measured on batched (N, C, ...) inputs only, "
                f"got an input of shape {tuple(module.input0.shape)}."
            )
        return [
            pooling_matrix(int(a), int(b), like.dtype, like.device)
            for a, b in zip(spatial_in, spatial_out, strict=True)
        ]

    def _apply(self, mat: Tensor, matrices: list[Tensor]) -> Tensor:
        first = mat.dim() - self.dimensions
        for offset, matrix in enumerate(matrices):
            axis = first + offset
            mat = (mat.movedim(axis, -1) @ matrix).movedim(-1, axis)
        return mat

    def _jac_t_mat_prod(self, module, g_inp, g_out, mat, subsampling=None) -> Tensor:
        return self._apply(mat, self._matrices(module, mat))

    def _jac_mat_prod(self, module, g_inp, g_out, mat) -> Tensor:
        return self._apply(mat, [m.T for m in self._matrices(module, mat)])


#: Module types BackPACK has no ``SqrtGGN`` extension for, registered by FactorCapture.
EXTRA_MODULE_EXTENSIONS = {
    nn.AdaptiveAvgPool1d: lambda: SqrtGGNBaseModule(AdaptiveAvgPoolDerivatives(1)),
    nn.AdaptiveAvgPool2d: lambda: SqrtGGNBaseModule(AdaptiveAvgPoolDerivatives(2)),
    nn.AdaptiveAvgPool3d: lambda: SqrtGGNBaseModule(AdaptiveAvgPoolDerivatives(3)),
}


__all__ = ["EXTRA_MODULE_EXTENSIONS", "AdaptiveAvgPoolDerivatives", "pooling_matrix"]
