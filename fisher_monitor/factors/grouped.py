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
from fisher_monitor.factors.weight_sharing import WeightSharingFactors, one_position_grams

#: Bytes of the ``(G_c, K·N, K'·N)`` products summed at once by the one-position Grams.
GROUP_CHUNK_BYTES = 16 << 20


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

    # ------------------------------------------------- one position: the groups batched
    @property
    def single_position(self) -> bool:
        """Whether every group sees one position (``T = 1``).

        E.g. a ``3 × 3`` convolution on a ``1 × 1`` map, RegNet's last stage on small
        images. Each group is then a sum-free outer product, and every Gram matrix and diagonal is
        one batched product over the groups instead of one weight-sharing computation per
        group (a few hundred small ones on RegNetY's last stage).
        """
        return self.groups[0].positions == 1

    def _stacked_sides(self, which: str, dtype: torch.dtype) -> Tensor:
        """``(G, K·N, O_g)``: the groups' output sides (``"v"``: ``s``; ``"u"``: ``δ/√N``)."""
        sides = [group._sides(which, dtype)[:, :, 0] for group in self.groups]  # (K, N, O_g)
        return torch.stack(sides).flatten(1, 2)

    def _stacked_inputs(self, dtype: torch.dtype) -> Tensor:
        """``(G, N, I_g)``: the groups' augmented inputs."""
        return torch.stack([group.inputs[:, 0] for group in self.groups]).to(dtype)

    def _input_grams(self) -> Tensor:
        """``(G, N, N)``: ``X̃_g X̃_gᵀ`` in :attr:`dtype`, formed once."""
        cached = self.__dict__.get("_grouped_input_grams")
        if cached is None:
            x = self._stacked_inputs(self.dtype)
            cached = self.__dict__["_grouped_input_grams"] = torch.bmm(x, x.mT)
        return cached

    def _single_position_gram(self, left: str, right: str) -> Tensor:
        """``Σ_g`` of the groups' one-position Grams, batched (:func:`one_position_grams`)."""
        a = self._stacked_sides(left, self.dtype)
        b = None if right == left else self._stacked_sides(right, self.dtype)
        return one_position_grams(a, b, self._input_grams(), GROUP_CHUNK_BYTES)

    def _single_position_diagonals(self) -> tuple[Tensor, Tensor]:
        """``diag F`` and ``diag EF``: ``(Σ_k a²)ᵀ x̃²`` per group, one batched product each."""
        x_sq = self._stacked_inputs(self.dtype).square()  # (G, N, I_g)
        found = []
        for which in ("v", "u"):
            sides = self._stacked_sides(which, self.dtype)  # (G, K·N, O_g)
            squares = sides.square().view(sides.shape[0], -1, self.num_samples, sides.shape[2])
            matrices = torch.bmm(squares.sum(dim=1).mT, x_sq)  # (G, O_g, I_g)
            pieces = zip(self.groups, matrices, strict=True)
            found.append(self._assemble([group._ordered(matrix) for group, matrix in pieces]))
        return found[0], found[1]

    # ------------------------------------------------------------------ LayerFactors
    def mean_gradient(self) -> Tensor:  # noqa: D102
        return self._assemble([group.mean_gradient() for group in self.groups])

    def diagonals(self) -> tuple[Tensor, Tensor]:  # noqa: D102
        if self.single_position:
            return self._single_position_diagonals()
        pairs = [group.diagonals() for group in self.groups]
        return self._assemble([f for f, _ in pairs]), self._assemble([e for _, e in pairs])

    def _summed(self, gram: str) -> Tensor:
        """``Σ_g`` of the groups' Gram matrix ``gram`` (``"gram_u"``, …), added in place."""
        if self.single_position:
            left, right = {"gram_u": "uu", "gram_v": "vv", "gram_uv": "uv"}[gram]
            return self._single_position_gram(left, right)
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
