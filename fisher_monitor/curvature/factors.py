"""Per-layer factors of F and EF, and the small matrices the metrics are computed from.

For one layer (all trainable parameters of one module, ``D`` of them, flattened in
``named_parameters`` order) and a probe batch of ``N`` samples:

- ``U = [g_1 … g_N]/√N`` (``D × N``), ``g_n = ∇_θ ℓ_n`` the per-sample gradient, so
  ``EF = UUᵀ`` and the mean gradient is ``g = U 1/√N``;
- ``V`` (``D × R``) with ``F = VVᵀ``: ``R = C·N`` columns for the exact Fisher (``C``
  outputs per sample), ``R = M·N`` for ``M`` Monte-Carlo labels per sample.

Three representations, chosen by layer type:

- :class:`OuterProductFactors` (``Linear`` on ``(N, I)`` inputs): every column is an outer
  product, ``g_n = vec(δ_n x_nᵀ)`` and ``v_{r,n} = vec(s_{r,n} x_nᵀ)``, so Gram matrices
  are Hadamard products of small Grams, ``K_U = (ΔΔᵀ ⊙ XXᵀ)/N``, and nothing of size
  ``N × D`` is formed;
- :class:`WeightSharingFactors` (convolutions, ``Linear`` on sequences): sums of outer
  products over ``T`` positions, materialised per sample;
- :class:`MaterializedFactors` (any other layer BackPACK supports): ``U`` and ``V`` as
  given by BackPACK's parameter Jacobians.

A bias is handled as an extra input column of ones, the usual augmentation; the
conversion to ``named_parameters`` order happens only where a per-parameter layout
is returned (diagonals, mean gradient, dense blocks, directions).

The per-sample gradients never come from the network's own backward pass: the backends
push the loss side (see :mod:`fisher_monitor.likelihoods`) through the network, and
:class:`ColumnSplit` turns the backpropagated columns into ``V`` and ``U``. For the exact
Fisher ``U = VB`` with the closed-form coefficients ``B``, in float64, so the per-sample
gradients lie in the range of the Fisher's square root by construction; for the
Monte-Carlo Fisher the observed residual travels as one extra column.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fisher_monitor.metrics.kronecker import OuterSamples


@dataclass
class ColumnSplit:
    """How backpropagated loss-side columns split into ``V`` and the per-sample gradients.

    Attributes:
        fisher_columns: ``R_n``: the first columns per sample are ``V``'s.
        coefficients: ``β`` (``N × R_n``, float64) with ``g_n/√N = Σ_r β_{n,r} v_{r,n}``
            (exact Fisher); ``None`` when the last column is the observed residual.
        dtype: Floating-point type of the per-sample gradients (float64).
    """

    fisher_columns: int
    coefficients: Tensor | None
    dtype: torch.dtype = torch.float64

    def fisher(self, columns: Tensor) -> Tensor:
        """The ``R_n`` columns of ``V`` (``(R_n, N, ...)``) from all columns ``(R, N, ...)``."""
        return columns[: self.fisher_columns]

    def per_sample(self, columns: Tensor) -> Tensor:
        """Per-sample gradients at this point of the network, ``(N, ...)``, in :attr:`dtype`.

        ``√N Σ_r β_{n,r} c_{r,n}`` for the exact Fisher, ``√N c_{last,n}`` otherwise (the
        columns carry the ``1/√N`` of ``F = VVᵀ``).

        Accumulated in :attr:`dtype` one column at a time, in the memory layout of the
        columns (no converted or reordered copy of all of them).
        """
        n = columns.shape[1]
        if self.coefficients is None:
            return columns[-1].to(self.dtype) * n**0.5
        beta = self.coefficients.to(device=columns.device, dtype=self.dtype) * n**0.5
        shape = (n,) + (1,) * (columns.dim() - 2)
        combined = torch.zeros_like(columns[0], dtype=self.dtype)
        for r in range(self.fisher_columns):
            combined.addcmul_(columns[r], beta[:, r].view(shape))
        return combined


@dataclass
class KroneckerFactors:
    """Kronecker-factored Fisher ``G ⊗ A`` and the EF's per-sample gradients, same layout.

    Attributes:
        input_factor: ``A`` (``I × I``); ``None`` when its root is given and wide (fewer
            rows than ``I``): then ``A`` is never formed (see
            :func:`~fisher_monitor.metrics.kronecker.factor_basis`).
        output_factor: ``G`` (``O × O``); ``None`` likewise.
        samples: Per-sample gradients as ``N × O × I`` or :class:`OuterSamples`.
        input_root: ``X`` with ``XᵀX = A`` (lets a wide factor be diagonalised via ``XXᵀ``).
        output_root: ``S`` with ``SᵀS = G``.
        order: Maps an ``O × I`` matrix in this layout to ``named_parameters`` order.
    """

    input_factor: Tensor | None
    output_factor: Tensor | None
    samples: Tensor | OuterSamples
    input_root: Tensor | None = None
    output_root: Tensor | None = None
    order: Callable[[Tensor], Tensor] | None = None


class CoefficientMatrix:
    """The block-sparse ``B`` (``R × N``, ``R = R_n·N``) with ``U = VB``, stored as its entries.

    ``B[r·N + n, n] = β_{n,r}`` and every other entry is zero. A dense ``B`` holds ``R_n·N²``
    numbers (7 GB for a logistic regression on 30,000 samples); products with it take
    ``O(R·m)``. ``B @ x`` and ``x @ B`` work as for a tensor, ``dense()`` forms it where a
    path needs the explicit matrix (beside ``R × R`` Grams, which are larger anyway).

    Args:
        by_column: ``β`` as ``R_n × N`` (row ``r``: the ``r``-th coefficient of every sample).
    """

    def __init__(self, by_column: Tensor) -> None:
        self.by_column = by_column
        self.per_sample, self.num_samples = by_column.shape

    @property
    def shape(self) -> tuple[int, int]:
        """``(R, N)``."""
        return (self.per_sample * self.num_samples, self.num_samples)

    @property
    def dtype(self) -> torch.dtype:
        """The entries' type."""
        return self.by_column.dtype

    def _check(self, x: Tensor, size: int, side: str) -> None:
        if x.dim() not in (1, 2) or x.shape[0 if side == "right" else -1] != size:
            raise ValueError(
                f"CoefficientMatrix of shape {self.shape}: cannot multiply a tensor of shape "
                f"{tuple(x.shape)} on the {side}."
            )
        if x.dtype != self.dtype:
            raise TypeError(f"CoefficientMatrix holds {self.dtype}, the tensor {x.dtype}.")

    def __matmul__(self, x: Tensor) -> Tensor:
        """``B x`` for ``x`` of shape ``(N,)`` or ``(N, m)``."""
        self._check(x, self.num_samples, "right")
        if x.dim() == 1:
            return (self.by_column * x).reshape(-1)
        return (self.by_column.unsqueeze(-1) * x).reshape(-1, x.shape[-1])

    def __rmatmul__(self, x: Tensor) -> Tensor:
        """``x B`` for ``x`` of shape ``(R,)`` or ``(k, R)``."""
        self._check(x, self.shape[0], "left")
        if x.dim() == 1:
            return (x.view(self.per_sample, self.num_samples) * self.by_column).sum(0)
        rows = x.reshape(x.shape[0], self.per_sample, self.num_samples)
        return (rows * self.by_column).sum(1)

    def dense(self) -> Tensor:
        """The explicit ``R × N`` matrix."""
        n = self.num_samples
        matrix = self.by_column.new_zeros(self.per_sample, n, n)
        index = torch.arange(n, device=self.by_column.device)
        matrix[:, index, index] = self.by_column
        return matrix.reshape(-1, n)


class LayerFactors(ABC):
    """Factors of one layer's F and EF blocks (see the module docstring).

    The factors are kept in the network's floating-point type; Gram matrices and dense
    blocks are formed in ``dtype`` (float64 by default), because the damped solves built
    on them amplify rounding by up to ``1/λ``. Diagonals and the mean gradient are sums
    without such amplification and are formed in the network's type, then converted.
    """

    num_samples: int
    num_columns: int
    dimension: int
    dtype: torch.dtype
    #: ``β`` (``N × R_n``) with ``g_n/√N = Σ_r β_{n,r} v_{r,n}`` (exact Fisher), else ``None``
    coefficients: Tensor | None = None

    def coefficient_matrix(self) -> CoefficientMatrix | None:
        """``B`` (``R × N``) with ``U = VB``, from :attr:`coefficients`; ``None`` if unknown.

        Column ``(r, n)`` of ``V`` sits at row ``r·N + n``, so ``B[r·N + n, n] = β_{n,r}``;
        only the ``R`` non-zero entries are stored (:class:`CoefficientMatrix`).
        """
        beta = self.coefficients
        if beta is None or beta.shape[0] != self.num_samples:
            return None
        n, columns = beta.shape
        if columns * n != self.num_columns:
            return None
        return CoefficientMatrix(beta.T.to(self.dtype))

    @abstractmethod
    def v_combination(self, weights: Tensor) -> Tensor:
        """``V w`` for ``R`` weights: a ``D`` vector in ``named_parameters`` order."""

    @abstractmethod
    def u_combination(self, weights: Tensor) -> Tensor:
        """``U w`` for ``N`` weights: a ``D`` vector in ``named_parameters`` order."""

    @abstractmethod
    def mean_gradient(self) -> Tensor:
        """Mean gradient ``g`` (``D``, ``named_parameters`` order, ``dtype``)."""

    @abstractmethod
    def diagonals(self) -> tuple[Tensor, Tensor]:
        """``(diag F, diag EF)`` (each ``D``, ``named_parameters`` order, ``dtype``)."""

    @abstractmethod
    def gram_u(self) -> Tensor:
        """``K_U = UᵀU`` (``N × N``)."""

    @abstractmethod
    def gram_v(self) -> Tensor:
        """``K_V = VᵀV`` (``R × R``)."""

    @abstractmethod
    def gram_uv(self) -> Tensor:
        """``K_UV = UᵀV`` (``N × R``)."""

    @abstractmethod
    def dense_blocks(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(F, EF, g)``: ``D × D`` blocks and the mean gradient, all in ``dtype``."""

    def kronecker(self) -> KroneckerFactors | None:
        """Kronecker factors, or ``None`` where the layer type has none."""
        return None

    def prefers_dense(self) -> bool:
        """Whether ``D × D`` blocks are smaller than the Gram matrices (the dense path)."""
        return self.dimension <= max(self.num_samples, self.num_columns)


def augment(inputs: Tensor, weight: bool, bias: bool) -> Tensor:
    """Return the layer inputs with a trailing column of ones for the bias.

    Args:
        inputs: ``(..., I)`` inputs to the layer.
        weight: Whether the weight is trainable (keep the inputs).
        bias: Whether the bias is trainable (append ones).

    Returns:
        ``(..., I + 1)``, ``(..., I)`` or ``(..., 1)`` as the trainable parameters need.
    """
    parts = [inputs] if weight else []
    if bias:
        parts.append(torch.ones_like(inputs[..., :1]))
    return torch.cat(parts, dim=-1)


def to_parameter_order(matrix: Tensor, weight_columns: int, has_bias: bool) -> Tensor:
    """Flatten ``(..., O, I)`` augmented matrices into ``named_parameters`` order.

    The augmented layout puts the bias as the last column; PyTorch's order is the
    flattened weight, then the bias.

    Args:
        matrix: ``(..., O, weight_columns + has_bias)``.
        weight_columns: Number of weight input columns (0 when the weight is frozen).
        has_bias: Whether the last column is the bias.

    Returns:
        ``(..., O * weight_columns + O * has_bias)``.
    """
    parts = []
    if weight_columns:
        parts.append(matrix[..., :weight_columns].flatten(start_dim=-2))
    if has_bias:
        parts.append(matrix[..., weight_columns])
    return torch.cat(parts, dim=-1)


class MaterializedFactors(LayerFactors):
    """``U`` and ``V`` stored explicitly.

    Args:
        per_sample: ``(N, D)`` per-sample gradients ``g_n`` (not divided by ``√N``).
        sqrt: ``(R, D)`` square-root factor columns ``v_r`` with ``F = Σ_r v_r v_rᵀ``.
        dtype: Floating-point type of Gram matrices and dense blocks.
    """

    def __init__(self, per_sample: Tensor, sqrt: Tensor, dtype: torch.dtype = torch.float64):
        self.per_sample = per_sample
        self.sqrt = sqrt
        self.dtype = dtype
        self.num_samples, self.dimension = per_sample.shape
        self.num_columns = sqrt.shape[0]
        self._casted_factors: tuple[Tensor, Tensor] | None = None

    def mean_gradient(self) -> Tensor:  # noqa: D102
        return self.per_sample.mean(dim=0).to(self.dtype)

    def diagonals(self) -> tuple[Tensor, Tensor]:  # noqa: D102
        return (
            self.sqrt.square().sum(dim=0).to(self.dtype),
            self.per_sample.square().mean(dim=0).to(self.dtype),
        )

    def _casted(self) -> tuple[Tensor, Tensor]:
        if self._casted_factors is None:
            self._casted_factors = (self.per_sample.to(self.dtype), self.sqrt.to(self.dtype))
        return self._casted_factors

    def columns(self) -> tuple[Tensor, Tensor]:
        """``(U·√N, V)`` as ``N × D`` and ``R × D`` matrices in ``dtype``."""
        return self._casted()

    def gram_u(self) -> Tensor:  # noqa: D102
        u, _ = self._casted()
        return u @ u.T / self.num_samples

    def gram_v(self) -> Tensor:  # noqa: D102
        _, v = self._casted()
        return v @ v.T

    def gram_uv(self) -> Tensor:  # noqa: D102
        u, v = self._casted()
        return u @ v.T / self.num_samples**0.5

    def dense_blocks(self) -> tuple[Tensor, Tensor, Tensor]:  # noqa: D102
        u, v = self._casted()
        return v.T @ v, u.T @ u / self.num_samples, u.mean(dim=0)

    def v_combination(self, weights: Tensor) -> Tensor:  # noqa: D102
        return weights.to(self.dtype) @ self._casted()[1]

    def u_combination(self, weights: Tensor) -> Tensor:  # noqa: D102
        return weights.to(self.dtype) @ self._casted()[0] / self.num_samples**0.5


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
        return to_parameter_order(matrix, self.weight_columns, self.has_bias)

    def input_gram(self) -> Tensor:
        """``X̃X̃ᵀ`` (``N × N``), shared by every Gram matrix."""
        if self._input_gram is None:
            self._input_gram = self.inputs @ self.inputs.T
        return self._input_gram

    def _flat_sqrt(self) -> Tensor:
        return self.sqrt.reshape(-1, self.out_features)  # column (r, n) at r * N + n

    def mean_gradient(self) -> Tensor:  # noqa: D102
        return self._order(self.output_grads.T @ self.inputs / self.num_samples)

    def diagonals(self) -> tuple[Tensor, Tensor]:  # noqa: D102
        inputs, _, sqrt = self.raw
        fisher = sqrt.square().sum(dim=0).T @ inputs.square()  # in the network's type
        empirical = (self.output_grads.square().T @ self.inputs.square()) / self.num_samples
        return self._order(fisher).to(self.dtype), self._order(empirical)

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

    def dense_blocks(self) -> tuple[Tensor, Tensor, Tensor]:  # noqa: D102
        per_sample = self._order(self.output_grads.unsqueeze(2) * self.inputs.unsqueeze(1))
        x = self.inputs.unsqueeze(0).expand(self.sqrt.shape[0], -1, -1)
        sqrt = self._order(self.sqrt.unsqueeze(3) * x.unsqueeze(2)).reshape(-1, self.dimension)
        return (
            sqrt.T @ sqrt,
            per_sample.T @ per_sample / self.num_samples,
            per_sample.mean(dim=0),
        )

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
        return KroneckerFactors(
            input_factor=root.T @ root,
            output_factor=s.T @ s,
            samples=OuterSamples(self.output_grads, self.inputs),
            input_root=root,
            output_root=s,
            order=self._order,
        )


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
        return to_parameter_order(matrix, self.weight_columns, self.has_bias)

    def _ordered(self, matrix: Tensor, scale: float = 1.0) -> Tensor:
        """``scale · matrix`` (``O × I``) in ``named_parameters`` order and :attr:`dtype`.

        One allocation and one converting copy (large fresh allocations cost page faults).
        """
        o, columns = self.out_features, self.weight_columns
        if not self.has_bias and matrix.dtype == self.dtype and matrix.is_contiguous():
            return matrix.view(-1).mul_(scale) if scale != 1.0 else matrix.view(-1)
        result = torch.empty(self.dimension, dtype=self.dtype, device=matrix.device)
        if columns:
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
        if self._gram_uses_pairs(a.shape[0], b.shape[0]):
            if left == right:
                a = a.to(self.dtype)
                return self._pair_gram(a, a, symmetric=True)
            return self._pair_gram(a.to(self.dtype), b.to(self.dtype))
        return self._materialised_gram(a, b, symmetric=left == right)

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
