"""Compact factors of a layer whose per-sample gradients are sums of outer products.

``Linear`` layers, convolutions (their inputs unfolded), Hugging Face's ``Conv1D`` (a
``Linear`` storing its weight transposed) and embeddings (a ``Linear`` on one-hot inputs,
weight stored transposed) all have per-sample gradients
``g_n = vec(Σ_t δ_{n,t} x̃_{n,t}ᵀ)`` and Fisher columns ``v_{r,n} = vec(Σ_t s_{r,n,t} x̃_{n,t}ᵀ)``.
From the layer's inputs and the loss-side columns backpropagated to its output, any backend
builds the same :class:`~fisher_monitor.factors.OuterProductFactors` (one position) or
:class:`~fisher_monitor.factors.WeightSharingFactors` (several; one per group of a grouped
convolution, :class:`~fisher_monitor.factors.GroupedFactors`), or, where a parameter is
shared with another layer, the materialised per-sample columns.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fisher_monitor.factors import (
    ColumnSplit,
    GroupedFactors,
    LayerFactors,
    OuterProductFactors,
    WeightSharingFactors,
    augment,
)

#: Convolutions captured as weight-sharing factors (zero padding; grouped ones per group).
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_transposed_linear(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W`` stored as ``(I, O)``."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, Tensor)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


def is_plain_embedding(module: nn.Module) -> bool:
    """An ``nn.Embedding`` whose gradient is a sum over its lookups.

    Not with ``max_norm`` (the lookup rewrites the weight) or ``scale_grad_by_freq`` (the
    gradient depends on the whole batch's token counts).
    """
    return (
        isinstance(module, nn.Embedding)
        and module.max_norm is None
        and not module.scale_grad_by_freq
    )


def _own_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    """Whether ``module`` is a ``base`` that computes what ``base`` computes.

    A subclass may rescale the output, pad differently, standardise the weight or read
    other inputs.
    """
    return isinstance(module, base) and type(module).forward is base.forward


def has_structured_rule(module: nn.Module) -> bool:
    """Whether a module's factors can be formed from its inputs and output columns.

    Only for the modules' own ``forward``: a subclass that overrides it (a scaled
    embedding, a positional embedding that builds its own indices, a convolution with
    "same" padding of its own) is measured by its module's pull-back instead.
    """
    if _own_forward(module, nn.Linear) or is_transposed_linear(module):
        return True
    if is_plain_embedding(module):
        return _own_forward(module, nn.Embedding)
    for convolution in CONVOLUTIONS:
        if _own_forward(module, convolution):
            return module.padding_mode == "zeros"
    return False


#: Grouped convolutions with at most this many groups get one compact factor per group
#: (:class:`~fisher_monitor.factors.GroupedFactors`); with more (depthwise convolutions: one
#: group per channel), each group's work is too small for its overhead, and the per-sample
#: columns are materialised instead (:func:`structured_pullbacks`, one batched product).
MAX_FACTOR_GROUPS = 64


def _groups(module: nn.Module) -> int:
    """A convolution's groups (1 for any other module)."""
    return module.groups if isinstance(module, CONVOLUTIONS) else 1


def has_compact_factors(module: nn.Module) -> bool:
    """Whether :func:`structured_factors` applies (else the columns are materialised)."""
    return has_structured_rule(module) and _groups(module) <= MAX_FACTOR_GROUPS


def unfold_convolution_input(module: nn.Module, inputs: Tensor) -> Tensor:
    """``(N, T, C_in·k)``: the patches a convolution multiplies its weight with, per position.

    Zero padding (``padding="same"`` included), stride and dilation as the module applies
    them; each patch's entries in the weight's ``(C_in, k_1, …, k_d)`` order, positions in
    the output's order.
    """
    dims = inputs.dim() - 2
    patches = nn.functional.pad(inputs, list(module._reversed_padding_repeated_twice))
    for axis in range(dims):
        span = module.dilation[axis] * (module.kernel_size[axis] - 1) + 1
        patches = patches.unfold(2 + axis, span, module.stride[axis])
        patches = patches[..., :: module.dilation[axis]]  # the new last axis: the span
    # (N, C, T_1, …, T_d, k_1, …, k_d) → (N, T_1, …, T_d, C, k_1, …, k_d)
    order = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]
    n = inputs.shape[0]
    count = 1
    for size in patches.shape[2 : 2 + dims]:
        count *= int(size)
    return patches.permute(order).reshape(n, count, -1)


def one_hot_lookups(module: nn.Embedding, indices: Tensor) -> Tensor:
    """``(N, T, V)``: each lookup as a one-hot row, in the weight's type.

    The row of a ``padding_idx`` lookup is zero: that row of the weight gets no gradient.
    """
    hot = nn.functional.one_hot(indices.reshape(indices.shape[0], -1), module.num_embeddings)
    if module.padding_idx is not None:
        hot[..., module.padding_idx] = 0
    return hot.to(module.weight.dtype)


def structured_inputs(module: nn.Module, inputs: Tensor) -> Tensor:
    """The layer inputs as ``(N, T, I)`` (convolutions unfolded, lookups one-hot, no bias)."""
    if isinstance(module, CONVOLUTIONS):
        return unfold_convolution_input(module, inputs)
    if isinstance(module, nn.Embedding):
        return one_hot_lookups(module, inputs)
    return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])


def structured_columns(module: nn.Module, columns: Tensor) -> Tensor:
    """The backpropagated columns at the output as ``(R, N, T, O)``."""
    r, n = columns.shape[:2]
    if isinstance(module, CONVOLUTIONS):
        return columns.reshape(r, n, columns.shape[2], -1).transpose(2, 3)
    return columns.reshape(r, n, -1, columns.shape[-1])


def structured_factors(
    module: nn.Module,
    inputs: Tensor,
    columns: Tensor,
    split: ColumnSplit,
    trainable: list[Tensor],
    dtype: torch.dtype,
) -> LayerFactors:
    """The compact factors of a layer with a structured rule.

    Args:
        module: The layer's module (``Linear``, ``ConvNd`` or ``Conv1D``).
        inputs: Its input, as the module received it (detached).
        columns: The loss-side columns backpropagated to its output, ``(R, N, *output)``.
        split: How the columns split into ``V`` and the per-sample gradients.
        trainable: The layer's trainable parameters (weight and/or bias).
        dtype: Floating-point type of Gram matrices and dense blocks.
    """
    has_weight = any(p is getattr(module, "weight", None) for p in trainable)
    has_bias = any(p is getattr(module, "bias", None) for p in trainable)
    x = structured_inputs(module, inputs)
    s = structured_columns(module, columns)
    groups = _groups(module)
    if groups > 1:
        per_group = []
        for x_g, s_g in zip(x.chunk(groups, dim=-1), s.chunk(groups, dim=-1), strict=True):
            sqrt, output_grads = split.fisher(s_g), split.per_sample(s_g)
            columns_g = x_g.shape[-1] if has_weight else 0
            augmented = augment(x_g, has_weight, has_bias)
            per_group.append(
                WeightSharingFactors(augmented, output_grads, sqrt, columns_g, has_bias, dtype)
            )
        grouped = GroupedFactors(per_group, dtype)
        grouped.coefficients = split.coefficients
        return grouped
    augmented = augment(x, has_weight, has_bias)
    weight_columns = x.shape[-1] if has_weight else 0
    sqrt, output_grads = split.fisher(s), split.per_sample(s)
    transposed = is_transposed_linear(module) or isinstance(module, nn.Embedding)
    if x.shape[1] == 1 and not isinstance(module, CONVOLUTIONS):
        factors: LayerFactors = OuterProductFactors(
            augmented[:, 0], output_grads[:, 0], sqrt[:, :, 0], weight_columns, has_bias, dtype
        )
    else:
        factors = WeightSharingFactors(
            augmented, output_grads, sqrt, weight_columns, has_bias, dtype
        )
    factors.transposed_weight = transposed
    factors.coefficients = split.coefficients
    return factors


def structured_pullbacks(module: nn.Module, inputs: Tensor, columns: Tensor) -> dict[str, Tensor]:
    """Per parameter of the module, ``(R, N, *shape)``: each column pulled back per sample.

    The materialised form of :func:`structured_factors`, for a parameter shared by several
    layers (its per-sample gradient sums over the uses).
    """
    x = structured_inputs(module, inputs).to(columns.dtype)
    s = structured_columns(module, columns)
    found: dict[str, Tensor] = {}
    weight = getattr(module, "weight", None)
    groups = _groups(module)
    if isinstance(weight, Tensor):
        # O_g × I_g per group, column and sample; the groups' rows stacked in order
        xg = x.reshape(*x.shape[:2], groups, -1)
        sg = s.reshape(*s.shape[:3], groups, -1)
        matrices = torch.einsum("rntgo,ntgi->rngoi", sg, xg).flatten(2, 3)
        if is_transposed_linear(module) or isinstance(module, nn.Embedding):
            matrices = matrices.transpose(-1, -2)
        found["weight"] = matrices.reshape(*s.shape[:2], *weight.shape)
    if isinstance(getattr(module, "bias", None), Tensor):
        found["bias"] = s.sum(dim=2)
    return found


__all__ = [
    "CONVOLUTIONS",
    "MAX_FACTOR_GROUPS",
    "has_compact_factors",
    "has_structured_rule",
    "is_transposed_linear",
    "structured_factors",
    "structured_pullbacks",
    "unfold_convolution_input",
]
