"""Factors of a ``Linear`` layer on ``(N, I)`` inputs: every column is an outer product.

``g_n = vec(δ_n x̃_nᵀ)`` and ``v_{r,n} = vec(s_{r,n} x̃_nᵀ)``, so Gram matrices are Hadamard
products of small Grams, ``K_U = (ΔΔᵀ ⊙ XXᵀ)/N``, and nothing of size ``N × D`` is formed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fisher_monitor.factors.base import (
    KroneckerFactors,
    LayerFactors,
    OuterSamples,
    ordered_copy,
    to_parameter_order,
)
from fisher_monitor.factors.shape import CURVATURE_BYTES, RATES, LayerShape, PassSize
from fisher_monitor.linalg import (
    Workspace,
    current_workspace,
    power_of_two_scale,
    symmetric_product,
)

#: Samples per matrix product of the fused diagonals: longer sums are split into chunks of
#: this many samples, gathered in float64 (a float32 product of 256 terms carries a relative
#: rounding of about 1e-6 at worst, 1e-7 typically).
SAMPLE_CHUNK = 256


def _chunked_product(left: Tensor, right: Tensor, dtype: torch.dtype, out: Tensor) -> Tensor:
    """``leftᵀ right`` (``(N, a)ᵀ (N, b)``) into ``out``.

    Beyond :data:`SAMPLE_CHUNK` samples the chunks' products are summed in ``dtype`` (and
    returned in ``dtype``).
    """
    n = left.shape[0]
    torch.mm(left[:SAMPLE_CHUNK].mT, right[:SAMPLE_CHUNK], out=out)
    if n <= SAMPLE_CHUNK:
        return out
    total = out.to(dtype)
    for start in range(SAMPLE_CHUNK, n, SAMPLE_CHUNK):
        total += left[start : start + SAMPLE_CHUNK].mT @ right[start : start + SAMPLE_CHUNK]
    return out.copy_(total) if out.dtype == dtype else total


class OuterProductFactors(LayerFactors):
    """Factors of a ``Linear`` layer on ``(N, I)`` inputs, kept as outer products.

    Args:
        inputs: ``(N, I)`` augmented inputs ``x̃_n`` (see :func:`augment`).
        output_grads: ``(N, O)`` per-sample output gradients ``δ_n`` with
            ``g_n = vec(δ_n x̃_nᵀ)``.
        sqrt: ``(R_n, N, O)`` square-root factors at the output, ``v_{r,n} = vec(s_{r,n} x̃_nᵀ)``.
        weight_columns: Number of weight columns in ``inputs`` (0: frozen weight).
        has_bias: Whether ``inputs`` ends with the bias column.
        dtype: Floating-point type of Gram matrices, dense blocks and Kronecker factors.
    """

    method = "outer products"

    def __init__(
        self,
        inputs: Tensor,
        output_grads: Tensor,
        sqrt: Tensor,
        weight_columns: int,
        has_bias: bool,
        dtype: torch.dtype = torch.float64,
    ):
        self.raw = (inputs, output_grads, sqrt)
        self.dtype = dtype
        self.weight_columns = weight_columns
        self.has_bias = has_bias
        self.num_samples, self.in_features = inputs.shape
        self.out_features = output_grads.shape[1]
        self.num_columns = sqrt.shape[0] * sqrt.shape[1]
        self.dimension = self.in_features * self.out_features
        self._casted_factors: tuple[Tensor, Tensor, Tensor] | None = None
        self._input_gram: Tensor | None = None
        self._fused_values: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def inputs(self) -> Tensor:
        """``x̃`` in ``dtype``."""
        return self._casted()[0]

    @property
    def output_grads(self) -> Tensor:
        """``δ`` in ``dtype``."""
        return self._casted()[1]

    @property
    def sqrt(self) -> Tensor:
        """``s`` in ``dtype``."""
        return self._casted()[2]

    def _casted(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._casted_factors is None:
            self._casted_factors = tuple(t.to(self.dtype) for t in self.raw)  # type: ignore[assignment]
        return self._casted_factors  # type: ignore[return-value]

    def _order(self, matrix: Tensor) -> Tensor:
        return to_parameter_order(
            matrix, self.weight_columns, self.has_bias, self.transposed_weight
        )

    def input_gram(self) -> Tensor:
        """``X̃X̃ᵀ`` (``N × N``), shared by every Gram matrix."""
        if self._input_gram is None:
            self._input_gram = self.inputs @ self.inputs.T
        return self._input_gram

    def _flat_sqrt(self) -> Tensor:
        return self.sqrt.reshape(-1, self.out_features)  # column (r, n) at r * N + n

    def mean_gradient(self) -> Tensor:  # noqa: D102
        return self._fused()[2]

    def diagonals(self) -> tuple[Tensor, Tensor]:  # noqa: D102
        fisher, empirical, _ = self._fused()
        return fisher, empirical

    def _fused(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(diag F, diag EF, g)`` in ``named_parameters`` order and ``dtype``, formed once.

        ``diag F = (Σ_r s_r²)ᵀ x̃²`` and ``diag EF = (δ²)ᵀ x̃² / N`` share one matrix product,
        ``g = δᵀx̃ / N`` is another, in the network's precision (float32), the sums over
        more than :data:`SAMPLE_CHUNK` samples gathered in float64 chunk by chunk. The output
        side is scaled by a power of two first (:func:`power_of_two_scale`), so that squares
        of tiny output gradients (a fitted sample's) do not vanish into float32's
        denormals. No float64 copy of the factors is made.
        """
        if self._fused_values is None:
            self._fused_values = self._form_fused(current_workspace())
        return self._fused_values

    def _form_fused(self, workspace: Workspace) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`_fused`'s work; temporaries in the measurement's workspace."""
        inputs, grads, sqrt = self.raw
        precision = inputs.dtype if inputs.dtype in (torch.float32, torch.float64) else self.dtype
        device, o, n = inputs.device, self.out_features, self.num_samples
        sqrt_scale, grad_scale = power_of_two_scale(sqrt), power_of_two_scale(grads)
        left = workspace.take("diagonal-left", (n, 2 * o), precision, device)
        scaled = workspace.take("diagonal-scaled", sqrt.shape, precision, device)
        torch.mul(sqrt, sqrt_scale, out=scaled).square_()
        torch.sum(scaled, dim=0, out=left[:, :o])
        left[:, o:].copy_(grads).mul_(grad_scale)
        delta = workspace.take("diagonal-delta", (n, o), precision, device).copy_(left[:, o:])
        left[:, o:].square_()
        x_sq = torch.mul(
            inputs, inputs, out=workspace.take("diagonal-x", inputs.shape, precision, device)
        )
        squares = workspace.take("diagonal-squares", (2 * o, inputs.shape[1]), precision, device)
        squares = _chunked_product(left, x_sq.to(precision), self.dtype, squares)
        mean = workspace.take("diagonal-mean", (o, inputs.shape[1]), precision, device)
        mean = _chunked_product(delta, inputs.to(precision), self.dtype, mean)
        order = (self.weight_columns, self.has_bias, self.transposed_weight, self.dtype)
        return (
            ordered_copy(squares[:o], *order, scale=sqrt_scale**-2),
            ordered_copy(squares[o:], *order, scale=grad_scale**-2 / n),
            ordered_copy(mean, *order, scale=1.0 / (grad_scale * n)),
        )

    def gram_u(self) -> Tensor:  # noqa: D102
        return (self.output_grads @ self.output_grads.T) * self.input_gram() / self.num_samples

    def gram_v(self) -> Tensor:  # noqa: D102
        s = self._flat_sqrt()
        columns, n = self.sqrt.shape[0], self.num_samples
        gram = (s @ s.T).view(columns, n, columns, n)
        gram *= self.input_gram().view(1, n, 1, n)  # broadcast instead of tiling X̃X̃ᵀ
        return gram.view(columns * n, columns * n)

    def gram_uv(self) -> Tensor:  # noqa: D102
        s = self._flat_sqrt()
        columns, n = self.sqrt.shape[0], self.num_samples
        gram = (self.output_grads @ s.T).view(n, columns, n)
        gram *= self.input_gram().view(n, 1, n) / n**0.5
        return gram.view(n, columns * n)

    mixed_precision = True

    def gram_v_in(self, dtype: torch.dtype, out: Tensor) -> Tensor:  # noqa: D102
        # the output side in dtype (the network's float32 columns as they are), the input
        # Gram in float64 first: (s·s')(x̃·x̃') is exact to dtype's rounding of the first dot
        s = self.raw[2].reshape(-1, self.out_features).to(dtype)
        columns, n = self.raw[2].shape[0], self.num_samples
        symmetric_product(s, out)
        out.view(columns, n, columns, n).mul_(self.input_gram().to(dtype).view(1, n, 1, n))
        return out

    def gram_v_product(self, weights: Tensor) -> Tensor:  # noqa: D102
        # (K_V w)_{r,n} = s_{r,n}·Σ_m (x̃_n·x̃_m) Σ_r' w_{r',m} s_{r',m}: 2N²O + 4RO per column
        vector = weights.dim() == 1
        # contiguous: the refinement's R × k right-hand sides come column-major, and einsum's
        # batched product then copies each sample's k × R_n slice apart (3× slower)
        columns = weights.to(self.dtype).reshape(self.num_columns, -1).contiguous()
        w = columns.view(self.sqrt.shape[0], self.num_samples, -1)
        combined = torch.einsum("rno,rnk->nko", self.sqrt, w)
        mixed = (self.input_gram() @ combined.flatten(1)).view_as(combined)
        out = torch.einsum("rno,nko->rnk", self.sqrt, mixed).reshape(-1, w.shape[-1])
        return out.squeeze(1) if vector else out

    def gram_v_diagonal(self) -> Tensor:  # noqa: D102
        # (R_n, N), without a temporary of the factor's size (4.7 MB for 9 × 128 × 512)
        sqrt_sq = torch.linalg.vector_norm(self.sqrt, dim=-1).square()
        return (sqrt_sq * torch.diagonal(self.input_gram())).reshape(-1)

    def gram_length(self) -> int:  # noqa: D102
        return self.out_features

    @classmethod
    def product_flops(cls, shape: LayerShape, size: PassSize) -> float:  # noqa: D102
        n, o = float(size.samples), float(shape.outputs)
        return 2.0 * n * n * o + 4.0 * size.rank * o

    def dense_blocks(self) -> tuple[Tensor, Tensor, Tensor]:  # noqa: D102
        per_sample = self._order(self.output_grads.unsqueeze(2) * self.inputs.unsqueeze(1))
        x = self.inputs.unsqueeze(0).expand(self.sqrt.shape[0], -1, -1)
        sqrt = self._order(self.sqrt.unsqueeze(3) * x.unsqueeze(2)).reshape(-1, self.dimension)
        return (
            sqrt.T @ sqrt,
            per_sample.T @ per_sample / self.num_samples,
            per_sample.mean(dim=0),
        )

    def fisher_block(self) -> Tensor:  # noqa: D102
        # F = Σ_n G_n ⊗ x̃_n x̃_nᵀ with G_n = Σ_r s_{r,n} s_{r,n}ᵀ: one product of N·O² by
        # N·I² (R_n times less work than VᵀV over the R columns), then reordered
        o, i, n = self.out_features, self.in_features, self.num_samples
        per_sample = torch.einsum("rno,rnp->nop", self.sqrt, self.sqrt).reshape(n, o * o)
        outer = (self.inputs.unsqueeze(2) * self.inputs.unsqueeze(1)).reshape(n, i * i)
        block = (per_sample.mT @ outer).view(o, o, i, i).permute(0, 2, 1, 3).reshape(o * i, o * i)
        index = self._order(torch.arange(o * i, device=block.device).view(o, i))
        return block[index][:, index]

    def sample_columns(self) -> Tensor:  # noqa: D102
        columns = self.output_grads.unsqueeze(2) * self.inputs.unsqueeze(1)  # (N, O, I)
        return self._order(columns).mT / self.num_samples**0.5

    def v_combination(self, weights: Tensor) -> Tensor:  # noqa: D102
        w = weights.to(self.dtype).view(self.sqrt.shape[0], self.num_samples)
        matrix = torch.einsum("rno,rn,ni->oi", self.sqrt, w, self.inputs)
        return self._order(matrix)

    def u_combination(self, weights: Tensor) -> Tensor:  # noqa: D102
        w = weights.to(self.dtype) / self.num_samples**0.5
        return self._order((self.output_grads * w.unsqueeze(1)).T @ self.inputs)

    def kronecker(self) -> KroneckerFactors:  # noqa: D102
        s = self._flat_sqrt()
        root = self.inputs / self.num_samples**0.5
        return KroneckerFactors(  # a wide root's factor is never formed (factor_basis)
            input_factor=None if root.shape[0] < root.shape[1] else root.T @ root,
            output_factor=None if s.shape[0] < s.shape[1] else s.T @ s,
            samples=OuterSamples(self.output_grads, self.inputs),
            input_root=root,
            output_root=s,
            order=self._order,
        )

    @classmethod
    def pass_flops(cls, shape: LayerShape, size: PassSize) -> float:  # noqa: D102
        # two fused float32 products over the samples (6ND), the output side's squares, and
        # the float64 diagonals and gradient written out (fresh pages)
        o, n, r = float(shape.outputs), float(size.samples), float(size.rank)
        return 6.0 * n * shape.dimension + 2.0 * r * o + 4.0 * RATES.entry * shape.dimension

    @classmethod
    def gram_flops(cls, shape: LayerShape, size: PassSize) -> float:  # noqa: D102
        n, r = float(size.samples), float(size.rank)
        return RATES.gemm64 * 2.0 * (r * r + 2.0 * n * r) * shape.outputs

    @classmethod
    def gram_v_flops(cls, shape: LayerShape, size: PassSize) -> float:  # noqa: D102
        return 2.0 * float(size.rank) ** 2 * shape.outputs

    @classmethod
    def fisher_block_flops(cls, shape: LayerShape, size: PassSize) -> float:  # noqa: D102
        n, o, i = float(size.samples), float(shape.outputs), float(shape.inputs)
        return RATES.gemm64 * (2.0 * n * o * o * i * i + 2.0 * n * shape.dimension)

    @classmethod
    def factor_bytes(cls, shape: LayerShape, size: PassSize) -> int:  # noqa: D102
        d, n, rn = CURVATURE_BYTES, size.samples, size.pass_columns
        t, i, o = shape.positions, shape.inputs, shape.outputs
        # diagonals; captured inputs (then with the bias column) and float64 output-side
        # factors (the cast columns, a contiguous copy, the per-sample output gradients)
        total = 4 * shape.dimension * d + 2 * n * t * i * size.itemsize
        total += (2 * rn + 1) * n * t * o * d
        return total + (n * i + size.rank * o) * d  # their float64 copies

    @classmethod
    def gram_bytes(cls, shape: LayerShape, size: PassSize) -> int:  # noqa: D102
        return 0  # Hadamard products of small Grams: nothing beyond the results


__all__ = ["OuterProductFactors"]
