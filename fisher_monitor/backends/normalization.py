"""Per-sample pull-backs of normalisation layers in closed form.

A normalisation with an elementwise affine map, ``y = γ ⊙ x̂ + β``, has per-sample
gradients ``Σ_p c_p ⊙ x̂_p`` for ``γ`` and ``Σ_p c_p`` for ``β`` (sums over the positions
``p`` the parameters are shared across), given the normalised input ``x̂`` and a column
``c`` at the output. ``x̂`` is recomputed from the layer's input:

- ``BatchNorm`` in eval mode (as measurements run it): the running statistics, per channel;
- ``LayerNorm``: mean and (biased) variance over the normalised trailing dimensions;
- ``GroupNorm``: mean and variance over each group's channels and positions, per sample.

Cheaper than a ``torch.func`` pull-back of the module per sample, and exact.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _normalised(module: nn.Module, x: Tensor) -> Tensor | None:
    """``x̂`` for a supported normalisation, else ``None``."""
    if isinstance(module, _BATCH_NORMS):
        if module.training or module.running_mean is None or module.running_var is None:
            return None  # batch statistics couple the samples
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = module.running_mean.to(x.dtype).view(shape)
        return (x - mean) * torch.rsqrt(module.running_var.to(x.dtype).view(shape) + module.eps)
    if isinstance(module, nn.LayerNorm):
        dims = tuple(range(-len(module.normalized_shape), 0))
        mean = x.mean(dim=dims, keepdim=True)
        variance = x.var(dim=dims, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(variance + module.eps)
    if isinstance(module, nn.GroupNorm):
        n, channels = x.shape[:2]
        grouped = x.reshape(n, module.num_groups, -1)
        mean = grouped.mean(dim=2, keepdim=True)
        variance = grouped.var(dim=2, unbiased=False, keepdim=True)
        return ((grouped - mean) * torch.rsqrt(variance + module.eps)).reshape(x.shape)
    return None


def normalization_pullbacks(module: nn.Module, x: Tensor, columns: Tensor) -> dict | None:
    """Per parameter, ``(R, N, *shape)``: the per-sample pull-backs of the columns.

    Args:
        module: A ``BatchNorm`` (eval), ``LayerNorm`` or ``GroupNorm`` module.
        x: Its input (detached).
        columns: ``(R, N, *output)`` at its output.

    Returns:
        ``{"weight": …, "bias": …}`` for its affine parameters, or ``None`` where the
        module is not one of these (or runs on batch statistics).
    """
    normalised = _normalised(module, x.to(columns.dtype))
    if normalised is None:
        return None
    r, n = columns.shape[:2]
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.LayerNorm):  # parameters over the trailing dimensions
        trailing = tuple(module.normalized_shape)
        flat = columns.reshape(r, n, -1, *trailing)
        products = (flat * normalised.reshape(n, -1, *trailing)).sum(dim=2)
        sums = flat.sum(dim=2)
    else:  # per channel, shared over the positions
        channels = columns.shape[2]
        flat = columns.reshape(r, n, channels, -1)
        products = (flat * normalised.reshape(n, channels, -1)).sum(dim=3)
        sums = flat.sum(dim=3)
    found = {}
    if isinstance(weight, Tensor):
        found["weight"] = products.reshape(r, n, *weight.shape)
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor):
        found["bias"] = sums.reshape(r, n, *bias.shape)
    return found


__all__ = ["normalization_pullbacks"]
