"""Factors of a layer that applies one weight at ``T`` positions (convolutions, sequences).

Sums of outer products over positions, never materialised as the whole ``R × D`` matrix;
each quantity is computed in the cheaper of two forms (:func:`weight_sharing_costs`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fisher_monitor.factors.base import (
    KroneckerFactors,
    LayerFactors,
    OuterSamples,
    to_parameter_order,
)
from fisher_monitor.factors.shape import CURVATURE_BYTES, RATES, LayerShape, PassSize

#: Largest intermediate tensor (bytes) a weight-sharing layer forms at once; larger work is
#: done in chunks (the memory model counts this bound).
CHUNK_BYTES = 2**27


#: Chunk of the materialised diagonal: small enough to stay in cache and reuse one buffer.
_DIAGONAL_CHUNK_BYTES = 2**23


#: Chunk of the position-pair Gram's intermediate (cache-sized: it is permuted once).
_PAIR_CHUNK_BYTES = 2**23


def weight_sharing_costs(
    left: int, right: int, samples: int, positions: int, outputs: int, inputs: int
) -> tuple[int, int]:
    """Multiply-adds of a cross Gram of weight-sharing columns, ``(materialised, pairs)``.

    For ``left·N`` and ``right·N`` columns ``M_c = Σ_t a_{c,t} x̃_{n(c),t}ᵀ`` (``O × I``):
    materialising them costs ``(left + right)·N·T·O·I`` plus the product
    ``left·right·N²·O·I``; the position-pair form
    ``⟨M_{r,n}, M_{s,m}⟩ = Σ_{t,o} a_{r,n,t,o} Σ_u K^x_{nt,mu} b_{s,m,u,o}`` with the input
    Gram ``K^x = X̃X̃ᵀ`` costs ``(NT)²·I + N²·T²·right·O + N²·left·right·T·O``.
    """
    n, t, o, i = samples, positions, outputs, inputs
    materialised = (left + right) * n * t * o * i + left * right * n * n * o * i
    pairs = (n * t) ** 2 * i + n * n * t * t * right * o + n * n * left * right * t * o
    return materialised, pairs


def weight_sharing_diagonal_costs(
    columns: int, samples: int, positions: int, outputs: int, inputs: int
) -> tuple[int, int]:
    """Multiply-adds of ``Σ_c diag(vec M_c vec M_cᵀ)`` for ``columns·N`` columns.

    ``(materialised, pairs)``: ``K·N·T·O·I`` (plus the squares) against the position-pair
    form ``Σ_{t≤u} w_{tu} (Σ_k a_{k,n,t,o} a_{k,n,u,o}) x̃_{n,t,i} x̃_{n,u,i}`` over the
    ``P = T(T+1)/2`` pairs, ``K·N·P·O + N·P·I + N·P·O·I`` (cheaper when ``T`` is small).
    """
    k, n, t, o, i = columns, samples, positions, outputs, inputs
    p = t * (t + 1) // 2
    materialised = k * n * t * o * i + k * n * o * i
    pairs = k * n * p * o + n * p * i + n * p * o * i
    return materialised, pairs


def symmetric_gram(columns: Tensor, blocks: int = 4) -> Tensor:
    """``C Cᵀ`` for a ``k × D`` matrix, forming only the upper block triangle (exactly symmetric).

    With ``b`` row blocks, ``b(b+1)/2`` of the ``b²`` block products are formed (about a
    third less work for ``b = 4``; BLAS has no symmetric rank-k update in PyTorch).
    """
    k = columns.shape[0]
    step = -(-k // blocks)
    gram = columns.new_empty(k, k)
    for start in range(0, k, step):
        gram[start : start + step, start:] = columns[start : start + step] @ columns[start:].T
    upper = gram.triu()
    return upper + upper.triu(1).T


def one_position_grams(
    a: Tensor, b: Tensor | None, input_grams: Tensor, chunk_bytes: int = CHUNK_BYTES
) -> Tensor:
    """``K[(k,n),(k',m)] = Σ_g (a_g b_gᵀ)[(k,n),(k',m)] (X̃_g X̃_gᵀ)[n,m]`` for ``T = 1``.

    One position per sample: each column is an outer product, so the Gram matrix is the
    output sides' Gram times the inputs' (the pair form would build an ``N² × K × O``
    intermediate, 32 MB for 440 outputs, 9 columns and 32 samples, for what is one
    product). ``G`` weights (the groups of a grouped convolution, or one) are summed in
    chunks whose ``(G_c, K·N, K'·N)`` products stay within ``chunk_bytes``.

    Args:
        a: ``(G, K·N, O)`` output sides, rows ``(k, n)``.
        b: ``(G, K'·N, O)``, or ``None`` for ``b = a``.
        input_grams: ``(G, N, N)``: ``X̃_g X̃_gᵀ``.
        chunk_bytes: Bytes of the products summed at once.
    """
    b = a if b is None else b
    g, rows, columns = a.shape[0], a.shape[1], b.shape[1]
    n = input_grams.shape[-1]
    ka, kb = rows // n, columns // n
    step = max(1, chunk_bytes // max(rows * columns * a.element_size(), 1))
    total = None
    for start in range(0, g, step):
        stop = min(start + step, g)
        products = torch.bmm(a[start:stop], b[start:stop].mT).view(-1, ka, n, kb, n)
        products *= input_grams[start:stop].view(-1, 1, n, 1, n)
        part = products.sum(dim=0)
        total = part if total is None else total.add_(part)
    return total.view(rows, columns)


class WeightSharingFactors(LayerFactors):
    """Factors of a layer that applies one weight at ``T`` positions (conv, sequence linear).

    ``g_n = vec(Σ_t δ_{n,t} x̃_{n,t}ᵀ)`` and ``v_{r,n} = vec(Σ_t s_{r,n,t} x̃_{n,t}ᵀ)``; the
    ``R × D`` matrix ``V`` is never formed for the whole layer. Each quantity is computed in
    whichever of two forms costs fewer multiply-adds (:func:`weight_sharing_costs`):

    - *materialised*, in chunks of at most :data:`CHUNK_BYTES`: the columns' ``O × I``
      matrices, then their squares or products (cheap when ``T`` is large and ``D`` small,
      e.g. the first convolutions of a CNN);
    - *position pairs*: ``⟨v_c, v_d⟩ = Σ_{t,u} ⟨s_{c,t}, s_{d,u}⟩⟨x̃_{n(c),t}, x̃_{n(d),u}⟩``
      and ``diag F_{oi} = Σ_n Σ_{t,u} (Σ_r s_{r,n,t,o} s_{r,n,u,o}) x̃_{n,t,i} x̃_{n,u,i}``
      (cheap when ``T`` is small and ``D`` large, e.g. the last convolutions of a ResNet on
      small images, where ``T = 1`` and both reduce to outer products), in float64.

    The Kronecker factors follow KFC (Grosse & Martens, 2016), also known as KFAC-expand:
    ``A = (1/N) Σ_{n,t} x̃_{n,t} x̃_{n,t}ᵀ`` and ``G = (1/T) Σ_{r,n,t} s_{r,n,t} s_{r,n,t}ᵀ``
    (``s`` already carries the ``1/√N``), so that ``G ⊗ A`` is exact for ``N = T = 1``.
    BackPACK's own ``KFLR``/``KFAC`` for convolutions sum the backpropagated square root
    over the positions *before* forming the output factor, so the two conventions are not
    proportional in general (on LeNet-5 they differ by 60–81% after the best rescaling);
    ours is the KFC of the literature.

    Args:
        inputs: ``(N, T, I)`` augmented inputs.
        output_grads: ``(N, T, O)`` per-sample output gradients.
        sqrt: ``(R_n, N, T, O)`` square-root factors at the output.
        weight_columns: Number of weight columns in ``inputs``.
        has_bias: Whether ``inputs`` ends with the bias column.
        dtype: Floating-point type of Gram matrices, dense blocks and Kronecker factors.
    """

    method = "weight-sharing outer products"

    def __init__(
        self,
        inputs: Tensor,
        output_grads: Tensor,
        sqrt: Tensor,
        weight_columns: int,
        has_bias: bool,
        dtype: torch.dtype = torch.float64,
    ):
        self.inputs = inputs
        self.output_grads = output_grads
        self.sqrt_at_output = sqrt
        self.weight_columns = weight_columns
        self.has_bias = has_bias
        self.dtype = dtype
        self.num_samples, self.positions, self.in_features = inputs.shape
        self.out_features = sqrt.shape[-1]
        self.fisher_columns = sqrt.shape[0]
        self.num_columns = self.fisher_columns * self.num_samples
        self.dimension = self.out_features * self.in_features
        self._mean: Tensor | None = None

    # ------------------------------------------------------------------ helpers

    def _order(self, matrix: Tensor) -> Tensor:
        return to_parameter_order(
            matrix, self.weight_columns, self.has_bias, self.transposed_weight
        )

    def _ordered(self, matrix: Tensor, scale: float = 1.0) -> Tensor:
        """``scale · matrix`` (``O × I``) in ``named_parameters`` order and :attr:`dtype`.

        One allocation and one converting copy (large fresh allocations cost page faults).
        """
        o, columns = self.out_features, self.weight_columns
        plain = not (self.has_bias or self.transposed_weight)
        if plain and matrix.dtype == self.dtype and matrix.is_contiguous():
            return matrix.view(-1).mul_(scale) if scale != 1.0 else matrix.view(-1)
        result = torch.empty(self.dimension, dtype=self.dtype, device=matrix.device)
        if columns and self.transposed_weight:
            result[: o * columns].view(columns, o).copy_(matrix[:, :columns].T)
        elif columns:
            result[: o * columns].view(o, columns).copy_(matrix[:, :columns])
        if self.has_bias:
            result[o * columns :].copy_(matrix[:, columns])
        return result.mul_(scale) if scale != 1.0 else result

    def _sides(self, which: str, dtype: torch.dtype) -> Tensor:
        """Output-side factors ``(K, N, T, O)``: ``"v"``: ``s``; ``"u"``: ``δ/√N``."""
        if which == "v":
            return self.sqrt_at_output.to(dtype)
        return self.output_grads.to(dtype).unsqueeze(0) / self.num_samples**0.5

    def _matrices(self, sides: Tensor, outputs: slice) -> Tensor:
        """``(K, N, O_b, I)``: ``Σ_t a_{k,n,t,o} x̃_{n,t,i}`` for the outputs in ``outputs``.

        One batched product per ``k`` (a broadcast product would copy the inputs ``K`` times).
        """
        inputs = self.inputs.to(sides.dtype)
        selected = sides[..., outputs].transpose(-1, -2)  # (K, N, O_b, T)
        result = sides.new_empty(*selected.shape[:3], self.in_features)
        for k in range(selected.shape[0]):
            torch.matmul(selected[k], inputs, out=result[k])
        return result

    def _output_blocks(self, rows: int, itemsize: int, limit: int = CHUNK_BYTES) -> list[slice]:
        """Slices of the outputs such that ``rows × O_b × I`` stays within ``limit`` bytes."""
        per_output = max(rows * self.in_features * itemsize, 1)
        step = max(1, min(self.out_features, limit // per_output))
        return [
            slice(o, min(o + step, self.out_features)) for o in range(0, self.out_features, step)
        ]

    def _materialised_diagonal(self, sides: Tensor, total: Tensor | None = None) -> Tensor:
        """``Σ_{k,n} M_{k,n}²`` (``O × I``, :attr:`dtype`) by materialising the matrices.

        The matrices are formed in the type of ``sides``, in cache-sized chunks into one
        reused buffer, and their squares summed in :attr:`dtype`.

        Args:
            sides: ``(K, N, T, O)`` output-side factors.
            total: Optional ``O × I`` buffer that receives ``Σ_{k,n} M_{k,n}``.
        """
        n, i = self.num_samples, self.in_features
        result = torch.zeros(self.out_features, i, dtype=self.dtype, device=sides.device)
        inputs = self.inputs.to(sides.dtype)
        blocks = self._output_blocks(n, sides.element_size(), _DIAGONAL_CHUNK_BYTES)
        buffer = sides.new_empty(n * (blocks[0].stop - blocks[0].start) * i)
        for outputs in blocks:
            size = outputs.stop - outputs.start
            out = buffer[: n * size * i].view(n, size, i)
            for side in sides:
                torch.matmul(side[..., outputs].transpose(-1, -2), inputs, out=out)
                if total is not None:
                    total[outputs] += out.sum(dim=0)
                result[outputs] += out.square_().sum(dim=0)
        return result

    def _pair_diagonal(self, sides: Tensor) -> Tensor:
        """``Σ_{k,n} M_{k,n}²`` (``O × I``, :attr:`dtype`) in the position-pair form.

        Only the pairs ``t ≤ u`` are formed (the others are their mirror images, counted
        twice). Formed in :attr:`dtype` (float64: for ``T > 1`` the cross terms may cancel).
        """
        n, t, i = self.inputs.shape
        dtype = self.dtype
        first, second = torch.triu_indices(t, t, device=sides.device)
        weight = torch.where(first == second, 1.0, 2.0).to(dtype).view(1, -1, 1)
        pairs = torch.zeros(n, first.numel(), self.out_features, dtype=dtype, device=sides.device)
        for side in sides:  # (N, T, O)
            side = side.to(dtype)
            pairs.addcmul_(side[:, first], side[:, second])
        pairs *= weight
        x = self.inputs.to(dtype)
        products = x[:, first] * x[:, second]  # (N, P, I)
        count = n * first.numel()
        return pairs.reshape(count, self.out_features).T @ products.reshape(count, i)

    def _uses_pairs(self, columns: int, itemsize: int) -> bool:
        """Whether the position-pair form of a diagonal is the cheaper one."""
        n, t, i = self.inputs.shape
        if t == 1:
            return True  # outer products: (Σ_k a²)ᵀ x² is one matrix product
        materialised, pairs = weight_sharing_diagonal_costs(columns, n, t, self.out_features, i)
        pair_bytes = 8 * n * t * (t + 1) // 2 * (self.out_features + i)
        # the pair form runs in float64: count it double against a float32 materialisation
        return pairs * (8 // itemsize) < materialised and pair_bytes <= CHUNK_BYTES

    def _diagonal(self, sides: Tensor) -> Tensor:
        """``Σ_{k,n} M_{k,n}²`` (``O × I``, :attr:`dtype`) in the cheaper form."""
        if self._uses_pairs(sides.shape[0], sides.element_size()):
            return self._pair_diagonal(sides)
        return self._materialised_diagonal(sides)

    def _gram_uses_pairs(self, left: int, right: int) -> bool:
        n, t, i = self.inputs.shape
        materialised, pairs = weight_sharing_costs(left, right, n, t, self.out_features, i)
        return pairs < materialised

    def _gram(self, left: str, right: str) -> Tensor:
        """``K[(k,n),(k',m)] = ⟨M^left_{k,n}, M^right_{k',m}⟩`` in :attr:`dtype`."""
        network = self.sqrt_at_output.dtype
        a, b = self._sides(left, network), self._sides(right, network)
        if self.positions == 1:
            return self._outer_gram(a, b if right != left else None)
        if self._gram_uses_pairs(a.shape[0], b.shape[0]):
            if left == right:
                a = a.to(self.dtype)
                return self._pair_gram(a, a, symmetric=True)
            return self._pair_gram(a.to(self.dtype), b.to(self.dtype))
        return self._materialised_gram(a, b, symmetric=left == right)

    def _outer_gram(self, a: Tensor, b: Tensor | None) -> Tensor:
        """One position (``T = 1``, e.g. a ``1 × 1`` map): :func:`one_position_grams`.

        ``b`` is ``None`` for a symmetric Gram.
        """
        left = a.to(self.dtype).reshape(1, -1, self.out_features)  # rows (k, n)
        right = None if b is None else b.to(self.dtype).reshape(1, -1, self.out_features)
        x = self.inputs[:, 0].to(self.dtype)
        return one_position_grams(left, right, (x @ x.T).unsqueeze(0))

    def _pair_gram(self, a: Tensor, b: Tensor, symmetric: bool = False) -> Tensor:
        """The cross Gram in the position-pair form (see :func:`weight_sharing_costs`).

        Processed in chunks of samples ``n`` whose intermediate stays in cache; for a
        symmetric Gram (``a`` is ``b``) only the samples ``m`` from the chunk on are formed
        and the rest is mirrored.
        """
        n, t, i = self.inputs.shape
        ka, kb, o = a.shape[0], b.shape[0], self.out_features
        x = self.inputs.to(self.dtype).reshape(n * t, i)
        inputs_gram = (x @ x.T).view(n, t, n, t)  # K^x[n, t, m, u]
        right = b.permute(1, 2, 0, 3).reshape(n, t, kb * o)  # (M, U, S·O)
        left = a.permute(1, 0, 2, 3).reshape(n, ka, t * o)  # (N, R, T·O)
        gram = a.new_empty(n, ka, n, kb)  # [n, r, m, s]
        step = max(1, _PAIR_CHUNK_BYTES // max(n * t * kb * o * a.element_size(), 1))
        starts = list(range(0, n, step))
        for start in starts:
            stop = min(start + step, n)
            size, first = stop - start, start if symmetric else 0
            others = n - first
            # W[m, (n,t), (s,o)] = Σ_u K^x[n, t, m, u] b[s, m, u, o] for n in the chunk
            chunk = inputs_gram[start:stop, :, first:].permute(2, 0, 1, 3)
            weighted = torch.bmm(chunk.reshape(others, size * t, t), right[first:])
            weighted = weighted.view(others, size, t, kb, o).permute(1, 2, 4, 0, 3)
            weighted = weighted.reshape(size, t * o, others * kb)
            block = torch.bmm(left[start:stop], weighted).view(size, ka, others, kb)
            gram[start:stop, :, first:] = block
        if symmetric:  # rows (n, r), columns (m, s): mirror the blocks left of each chunk
            flat = gram.view(n * ka, n * kb)
            for start in starts[1:]:
                stop = min(start + step, n)
                flat[start * ka : stop * ka, : start * kb] = flat[
                    : start * kb, start * ka : stop * ka
                ].T
        return gram.permute(1, 0, 3, 2).reshape(ka * n, kb * n)

    def _materialised_gram(self, a: Tensor, b: Tensor, symmetric: bool) -> Tensor:
        """The cross Gram from the columns materialised in chunks (network's type)."""
        ka, kb, n = a.shape[0], b.shape[0], self.num_samples
        gram = torch.zeros(ka * n, kb * n, dtype=self.dtype, device=a.device)
        for outputs in self._output_blocks(n * (ka + kb), 8):
            left = self._matrices(a, outputs).reshape(ka * n, -1).to(self.dtype)
            if symmetric:
                gram += symmetric_gram(left)
            else:
                gram += left @ self._matrices(b, outputs).reshape(kb * n, -1).to(self.dtype).T
        return gram

    def _materialised(self, which: str) -> Tensor:
        """``(K·N, D)`` columns in ``named_parameters`` order (dense blocks only)."""
        sides = self._sides(which, self.dtype)
        matrices = self._matrices(sides, slice(None))
        return self._order(matrices).reshape(-1, self.dimension)

    def _combination(self, combined: Tensor) -> Tensor:
        """``Σ_{n,t} c_{n,t} x̃_{n,t}ᵀ`` for ``(N, T, O)`` output-side weights, parameter order."""
        matrix = torch.einsum("nto,nti->oi", combined, self.inputs.to(self.dtype))
        return self._order(matrix)

    # ------------------------------------------------------------------ LayerFactors

    def mean_gradient(self) -> Tensor:  # noqa: D102
        if self._mean is None:
            # in the network's type, like the diagonals (a sum without amplification)
            grads = self.output_grads.to(self.sqrt_at_output.dtype)
            n, t, i = self.inputs.shape
            matrix = grads.reshape(n * t, -1).T @ self.inputs.reshape(n * t, i).to(grads.dtype)
            self._mean = self._ordered(matrix, 1.0 / n)
        return self._mean

    def diagonals(self) -> tuple[Tensor, Tensor]:  # noqa: D102
        # columns in the network's type, squares summed in float64 (no amplification)
        network = self.sqrt_at_output.dtype
        sides = self._sides("v", network)
        if self._uses_pairs(sides.shape[0], sides.element_size()):
            fisher = self._pair_diagonal(sides)
        else:
            fisher = self._materialised_diagonal(sides)
        sides = self._sides("u", network)  # δ/√N
        if self._uses_pairs(1, sides.element_size()):
            empirical = self._pair_diagonal(sides)
        else:  # the mean gradient comes with the materialised per-sample gradients
            total = sides.new_zeros(self.out_features, self.in_features)
            empirical = self._materialised_diagonal(sides, total)
            self._mean = self._ordered(total, self.num_samples**-0.5)
        return self._ordered(fisher), self._ordered(empirical)

    def gram_u(self) -> Tensor:  # noqa: D102
        return self._gram("u", "u")

    def gram_v(self) -> Tensor:  # noqa: D102
        return self._gram("v", "v")

    def gram_uv(self) -> Tensor:  # noqa: D102
        return self._gram("u", "v")

    def dense_blocks(self) -> tuple[Tensor, Tensor, Tensor]:  # noqa: D102
        v = self._materialised("v")
        u = self._materialised("u")  # columns g_n/√N
        return v.T @ v, u.T @ u, u.sum(dim=0) / self.num_samples**0.5

    def fisher_block(self) -> Tensor:  # noqa: D102
        v = self._materialised("v")
        return v.T @ v

    def sample_columns(self) -> Tensor:  # noqa: D102
        return self._materialised("u").T

    def v_combination(self, weights: Tensor) -> Tensor:  # noqa: D102
        w = weights.to(self.dtype).view(self.fisher_columns, self.num_samples)
        combined = torch.einsum("rnto,rn->nto", self.sqrt_at_output.to(self.dtype), w)
        return self._combination(combined)

    def u_combination(self, weights: Tensor) -> Tensor:  # noqa: D102
        w = weights.to(self.dtype) / self.num_samples**0.5
        return self._combination(self.output_grads.to(self.dtype) * w.view(-1, 1, 1))

    def kronecker(self) -> KroneckerFactors:  # noqa: D102
        n, t, i = self.inputs.shape
        x = self.inputs.reshape(n * t, i).to(self.dtype) / n**0.5
        s = self.sqrt_at_output.reshape(-1, self.out_features).to(self.dtype) / t**0.5
        grads = self.output_grads.to(self.dtype)
        samples: Tensor | OuterSamples
        if t == 1:  # one position: the per-sample gradients are outer products
            samples = OuterSamples(grads[:, 0], self.inputs[:, 0].to(self.dtype))
        else:
            samples = torch.einsum("nto,nti->noi", grads, self.inputs.to(self.dtype))
        return KroneckerFactors(
            input_factor=None if x.shape[0] < x.shape[1] else x.T @ x,  # wide: via the root
            output_factor=None if s.shape[0] < s.shape[1] else s.T @ s,
            samples=samples,
            input_root=x,
            output_root=s,
            order=self._order,
        )

    # ------------------------------------------------------------ work and memory

    @classmethod
    def pass_flops(cls, shape: LayerShape, size: PassSize) -> float:  # noqa: D102
        n, t, o, i = size.samples, shape.positions, shape.outputs, shape.inputs
        work = 2.0 * RATES.gemm64 * min(weight_sharing_diagonal_costs(size.columns + 1, n, t, o, i))
        return work + 4.0 * RATES.entry * shape.dimension

    @classmethod
    def gram_flops(cls, shape: LayerShape, size: PassSize) -> float:  # noqa: D102
        n, t, o, i, c = size.samples, shape.positions, shape.outputs, shape.inputs, size.columns
        return RATES.gemm64 * sum(  # K_V, K_UV, K_U, each in its cheaper form
            2.0 * min(weight_sharing_costs(left, right, n, t, o, i))
            for left, right in ((c, c), (1, c), (1, 1))
        )

    @classmethod
    def gram_v_flops(cls, shape: LayerShape, size: PassSize) -> float:  # noqa: D102
        n, t, o, i, c = size.samples, shape.positions, shape.outputs, shape.inputs, size.columns
        return 2.0 * min(weight_sharing_costs(c, c, n, t, o, i))

    @classmethod
    def factor_bytes(cls, shape: LayerShape, size: PassSize) -> int:  # noqa: D102
        d, s, n, rn = CURVATURE_BYTES, size.itemsize, size.samples, size.pass_columns
        t, i, o = shape.positions, shape.inputs, shape.outputs
        total = 4 * shape.dimension * d + 2 * n * t * i * s + (2 * rn + 1) * n * t * o * d
        if _diagonal_uses_pairs(rn, n, t, o, i, s):
            return total + d * n * t * (t + 1) // 2 * (o + i) + o * i * d
        return total + _DIAGONAL_CHUNK_BYTES + o * i * d

    @classmethod
    def gram_bytes(cls, shape: LayerShape, size: PassSize) -> int:  # noqa: D102
        d, s, n, rn = CURVATURE_BYTES, size.itemsize, size.samples, size.pass_columns
        t, i, o = shape.positions, shape.inputs, shape.outputs
        materialised, pairs = weight_sharing_costs(rn, rn, n, t, o, i)
        if pairs < materialised:
            return 2 * d * (n * t) ** 2 + 2 * rn * n * t * o * d + 2 * _PAIR_CHUNK_BYTES
        # chunks of the columns, in the network's type and in float64
        return min(size.rank * shape.dimension * d, CHUNK_BYTES) * (d + s) // d


def _diagonal_uses_pairs(rn: int, n: int, t: int, o: int, i: int, s: int) -> bool:
    """Whether a diagonal of ``rn`` columns per sample takes the position-pair form."""
    if t == 1:
        return True
    materialised, pairs = weight_sharing_diagonal_costs(rn, n, t, o, i)
    return pairs * (8 // s) < materialised and 8 * n * t * (t + 1) // 2 * (o + i) <= CHUNK_BYTES


__all__ = [
    "CHUNK_BYTES",
    "WeightSharingFactors",
    "symmetric_gram",
    "weight_sharing_costs",
    "weight_sharing_diagonal_costs",
]
