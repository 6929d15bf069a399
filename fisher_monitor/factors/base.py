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

from fisher_monitor.factors.shape import RATES, LayerShape, PassSize


@dataclass
class OuterSamples:
    """Per-sample gradients given as outer products ``M_n = δ_n x_nᵀ``.

    Attributes:
        output_grads: ``δ``, shape ``N × O``.
        inputs: ``x``, shape ``N × I``.
    """

    output_grads: Tensor
    inputs: Tensor


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
            :func:`~fisher_monitor.structures.kron.statistics.factor_basis`).
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
    #: Whether the weight is stored as ``(I, O)`` (Hugging Face's ``Conv1D``): only the
    #: order of per-parameter vectors changes, every metric is invariant.
    transposed_weight: bool = False
    #: How the representation forms the layer's columns, for the measurement's coverage.
    method: str = "per-sample columns"

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

    def cached_diagonals(self) -> tuple[Tensor, Tensor]:
        """:meth:`diagonals`, computed once per factors object."""
        cached = self.__dict__.get("_cached_diagonals")
        if cached is None:
            cached = self.__dict__["_cached_diagonals"] = self.diagonals()
        return cached

    @abstractmethod
    def gram_u(self) -> Tensor:
        """``K_U = UᵀU`` (``N × N``)."""

    @abstractmethod
    def gram_v(self) -> Tensor:
        """``K_V = VᵀV`` (``R × R``)."""

    @abstractmethod
    def gram_uv(self) -> Tensor:
        """``K_UV = UᵀV`` (``N × R``)."""

    # ---------------------------------------------------- mixed precision (the Gram route)
    #: Whether :meth:`gram_v_in` and :meth:`gram_v_product` are implemented: the Gram route
    #: may then factorise ``K_V`` in float32 and refine its solves in float64.
    mixed_precision: bool = False

    def gram_v_in(self, dtype: torch.dtype, out: Tensor) -> Tensor:
        """``K_V`` formed in ``dtype`` (float32: half the work) into ``out`` (``R × R``)."""
        raise NotImplementedError

    def gram_v_product(self, weights: Tensor) -> Tensor:
        """``K_V w`` in float64 for ``R`` or ``R × k`` weights, without forming ``K_V``."""
        raise NotImplementedError

    def gram_v_diagonal(self) -> Tensor:
        """``(K_V)_ii = ‖v_i‖²`` in float64 (``R``)."""
        raise NotImplementedError

    def gram_length(self) -> int:
        """Length of the dot products :meth:`gram_v_in` accumulates (its rounding grows with it)."""
        return self.dimension

    @classmethod
    def product_flops(cls, shape: LayerShape, size: PassSize) -> float:
        """Work of one :meth:`gram_v_product` with one column."""
        return 4.0 * size.rank * shape.dimension

    @abstractmethod
    def dense_blocks(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(F, EF, g)``: ``D × D`` blocks and the mean gradient, all in ``dtype``."""

    def fisher_block(self) -> Tensor:
        """``F = VVᵀ`` as a ``D × D`` matrix in ``dtype`` (the dense route)."""
        return self.dense_blocks()[0]

    def sample_columns(self) -> Tensor:
        """``U`` (``D × N``, columns ``g_n/√N`` in ``named_parameters`` order, ``dtype``)."""
        weights = torch.eye(self.num_samples, dtype=self.dtype)
        return torch.stack([self.u_combination(w) for w in weights], dim=1)

    def kronecker(self) -> KroneckerFactors | None:
        """Kronecker factors, or ``None`` where the layer type has none."""
        return None

    def prefers_dense(self) -> bool:
        """Whether ``D × D`` blocks are smaller than the Gram matrices (the dense path)."""
        return self.dimension <= max(self.num_samples, self.num_columns)

    # ------------------------------------------------------------ work and memory, per form
    # The cost and memory models (fisher_monitor.engine) ask the representation a layer will
    # have, from its shape alone, before anything is computed.

    # Work is counted in the units of :class:`~fisher_monitor.factors.Rates` (float32
    # matrix-product operations); float64 products are weighted by ``RATES.gemm64``.

    @classmethod
    def pass_flops(cls, shape: LayerShape, size: PassSize) -> float:
        """Work of forming the layer's diagonals and mean gradient from its factors."""
        raise NotImplementedError

    @classmethod
    def gram_flops(cls, shape: LayerShape, size: PassSize) -> float:
        """Work of the three Gram matrices ``K_V``, ``K_UV`` and ``K_U`` (float64)."""
        raise NotImplementedError

    @classmethod
    def gram_v_flops(cls, shape: LayerShape, size: PassSize) -> float:
        """Operations of forming ``K_V`` alone (unweighted: the caller knows the precision)."""
        return 2.0 * size.rank * size.rank * shape.dimension

    @classmethod
    def fisher_block_flops(cls, shape: LayerShape, size: PassSize) -> float:
        """Work of :meth:`fisher_block` and :meth:`sample_columns` (the dense route)."""
        return RATES.gemm64 * 2.0 * size.rank * shape.dimension**2

    @classmethod
    def factor_bytes(cls, shape: LayerShape, size: PassSize) -> int:
        """Peak bytes of the layer's factors, diagonals and mean gradient."""
        raise NotImplementedError

    @classmethod
    def gram_bytes(cls, shape: LayerShape, size: PassSize) -> int:
        """Bytes that forming the Gram matrices needs beyond the ``R × R`` results."""
        raise NotImplementedError


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


def ordered_copy(
    matrix: Tensor,
    weight_columns: int,
    has_bias: bool,
    transposed: bool,
    dtype: torch.dtype,
    scale: float = 1.0,
) -> Tensor:
    """``scale · matrix`` (``O × I`` augmented) in ``named_parameters`` order and ``dtype``.

    One allocation and one converting copy (:func:`to_parameter_order` concatenates).
    """
    o = matrix.shape[0]
    result = torch.empty(o * (weight_columns + has_bias), dtype=dtype, device=matrix.device)
    if weight_columns and transposed:
        result[: o * weight_columns].view(weight_columns, o).copy_(matrix[:, :weight_columns].T)
    elif weight_columns:
        result[: o * weight_columns].view(o, weight_columns).copy_(matrix[:, :weight_columns])
    if has_bias:
        result[o * weight_columns :].copy_(matrix[:, weight_columns])
    return result.mul_(scale) if scale != 1.0 else result


def to_parameter_order(
    matrix: Tensor, weight_columns: int, has_bias: bool, transposed: bool = False
) -> Tensor:
    """Flatten ``(..., O, I)`` augmented matrices into ``named_parameters`` order.

    The augmented layout puts the bias as the last column; PyTorch's order is the
    flattened weight, then the bias.

    Args:
        matrix: ``(..., O, weight_columns + has_bias)``.
        weight_columns: Number of weight input columns (0 when the weight is frozen).
        has_bias: Whether the last column is the bias.
        transposed: Whether the module stores its weight as ``(I, O)`` (Hugging Face's
            ``Conv1D``).

    Returns:
        ``(..., O * weight_columns + O * has_bias)``.
    """
    parts = []
    if weight_columns:
        weight = matrix[..., :weight_columns]
        parts.append((weight.mT if transposed else weight).flatten(start_dim=-2))
    if has_bias:
        parts.append(matrix[..., weight_columns])
    return torch.cat(parts, dim=-1)


__all__ = [
    "ColumnSplit",
    "CoefficientMatrix",
    "KroneckerFactors",
    "LayerFactors",
    "OuterSamples",
    "augment",
    "ordered_copy",
    "to_parameter_order",
]
