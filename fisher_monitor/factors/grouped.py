"""Factors of a grouped convolution: one weight-sharing factor per group.

A convolution with ``G`` groups applies ``G`` independent weights, each to its own block of
input channels and producing its own block of output channels (RegNet's and ResNeXt's
``3 × 3`` convolutions, depthwise convolutions). Its per-sample gradient is the
concatenation of the groups' gradients, each the weight-sharing sum of outer products
``Σ_t δ_{n,t,g} x̃_{n,t,g}ᵀ`` (:class:`~fisher_monitor.factors.WeightSharingFactors`). So
the Gram matrices are sums over the groups (``⟨v_c, v_d⟩ = Σ_g ⟨v_c^g, v_d^g⟩``), and
vectors are the groups' pieces in ``named_parameters`` order: the weight's rows group by
group (output channel ``o`` belongs to group ``o // O_g``), then the bias. Kronecker factors
are per group, not one pair for the layer, so there are none.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fisher_monitor.factors.base import LayerFactors
from fisher_monitor.factors.weight_sharing import WeightSharingFactors


class GroupedFactors(LayerFactors):
    """The factors of a grouped convolution from its groups' (module docstring).

    Args:
        groups: Each group's factors, in the order of the groups (their output channels).
        dtype: Floating-point type of Gram matrices and dense blocks.
    """

    method = "grouped weight-sharing outer products"

    def __init__(self, groups: Sequence[WeightSharingFactors], dtype: torch.dtype):
        self.groups = list(groups)
        first = self.groups[0]
        self.num_samples = first.num_samples
        self.num_columns = first.num_columns
        self.dimension = sum(group.dimension for group in self.groups)
        self.dtype = dtype
        self._weights = [group.out_features * group.weight_columns for group in self.groups]

    def _assemble(self, parts: Sequence[Tensor]) -> Tensor:
        """The groups' ``named_parameters``-ordered pieces (last axis) as the layer's."""
        weights = [part[..., :size] for part, size in zip(parts, self._weights, strict=True)]
        biases = [part[..., size:] for part, size in zip(parts, self._weights, strict=True)]
        return torch.cat(weights + biases, dim=-1)

    def v_combination(self, weights: Tensor) -> Tensor:  # noqa: D102
        return self._assemble([group.v_combination(weights) for group in self.groups])

    def u_combination(self, weights: Tensor) -> Tensor:  # noqa: D102
        return self._assemble([group.u_combination(weights) for group in self.groups])

    def mean_gradient(self) -> Tensor:  # noqa: D102
        return self._assemble([group.mean_gradient() for group in self.groups])

    def diagonals(self) -> tuple[Tensor, Tensor]:  # noqa: D102
        pairs = [group.diagonals() for group in self.groups]
        return self._assemble([f for f, _ in pairs]), self._assemble([e for _, e in pairs])

    def _summed(self, gram: str) -> Tensor:
        """``Σ_g`` of the groups' Gram matrix ``gram`` (``"gram_u"``, …), added in place."""
        total = getattr(self.groups[0], gram)()
        for group in self.groups[1:]:
            total += getattr(group, gram)()
        return total

    def gram_u(self) -> Tensor:  # noqa: D102
        return self._summed("gram_u")

    def gram_v(self) -> Tensor:  # noqa: D102
        return self._summed("gram_v")

    def gram_uv(self) -> Tensor:  # noqa: D102
        return self._summed("gram_uv")

    def _materialised(self, which: str) -> Tensor:
        """``(K·N, D)`` columns in ``named_parameters`` order (dense blocks only)."""
        return self._assemble([group._materialised(which) for group in self.groups])

    # the dense route from the materialised columns, as a single group's
    dense_blocks = WeightSharingFactors.dense_blocks
    fisher_block = WeightSharingFactors.fisher_block
    sample_columns = WeightSharingFactors.sample_columns


__all__ = ["GroupedFactors"]
