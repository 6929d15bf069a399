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
        """
        n = columns.shape[1]
        if self.coefficients is None:
            return columns[-1].to(self.dtype) * n**0.5
        fisher = columns[: self.fisher_columns].to(self.dtype)
        beta = self.coefficients.to(device=fisher.device, dtype=self.dtype)
        flat = fisher.reshape(self.fisher_columns, n, -1)
        combined = torch.einsum("rnk,nr->nk", flat, beta) * n**0.5
        return combined.reshape(fisher.shape[1:])


@dataclass
class KroneckerFactors:
    """Kronecker-factored Fisher ``G ⊗ A`` and the EF's per-sample gradients, same layout.

    Attributes:
        input_factor: ``A`` (``I × I``).
        output_factor: ``G`` (``O × O``).
        samples: Per-sample gradients as ``N × O × I`` or :class:`OuterSamples`.
        input_root: ``X`` with ``XᵀX = A`` (lets a wide factor be diagonalised via ``XXᵀ``).
        output_root: ``S`` with ``SᵀS = G``.
        order: Maps an ``O × I`` matrix in this layout to ``named_parameters`` order.
    """

    input_factor: Tensor
    output_factor: Tensor
    samples: Tensor | OuterSamples
    input_root: Tensor | None = None
    output_root: Tensor | None = None
    order: Callable[[Tensor], Tensor] | None = None


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

    def coefficient_matrix(self) -> Tensor | None:
        """``B`` (``R × N``) with ``U = VB``, from :attr:`coefficients`; ``None`` if unknown.

        Column ``(r, n)`` of ``V`` sits at row ``r·N + n``, so ``B[r·N + n, n] = β_{n,r}``.
        """
        beta = self.coefficients
        if beta is None or beta.shape[0] != self.num_samples:
            return None
        n, columns = beta.shape
        if columns * n != self.num_columns:
            return None
        matrix = torch.zeros(columns, n, n, dtype=self.dtype, device=beta.device)
        index = torch.arange(n, device=beta.device)
        matrix[:, index, index] = beta.T.to(self.dtype)
        return matrix.reshape(columns * n, n)

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


class WeightSharingFactors(MaterializedFactors):
    """Factors of a layer that applies one weight at ``T`` positions (conv, sequence linear).

    ``g_n = vec(Σ_t δ_{n,t} x̃_{n,t}ᵀ)`` and ``v_{r,n} = vec(Σ_t s_{r,n,t} x̃_{n,t}ᵀ)`` are
    materialised. The Kronecker factors follow KFC (Grosse & Martens, 2016), also known as
    KFAC-expand: ``A = (1/N) Σ_{n,t} x̃_{n,t} x̃_{n,t}ᵀ`` and
    ``G = (1/T) Σ_{r,n,t} s_{r,n,t} s_{r,n,t}ᵀ`` (``s`` already carries the ``1/√N``), so
    that ``G ⊗ A`` is exact for ``N = T = 1``. BackPACK's own ``KFLR``/``KFAC`` for
    convolutions sum the backpropagated square root over the positions *before* forming
    the output factor, so the two conventions are not proportional in general (on LeNet-5
    they differ by 60–81% after the best rescaling); ours is the KFC of the literature.

    Args:
        inputs: ``(N, T, I)`` augmented inputs.
        output_grads: ``(N, T, O)`` per-sample output gradients.
        sqrt: ``(R_n, N, T, O)`` square-root factors at the output.
        weight_columns: Number of weight columns in ``inputs``.
        has_bias: Whether ``inputs`` ends with the bias column.
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
        # materialised in the network's type (the sums over positions are the expensive part);
        # every Gram matrix is then formed in `dtype` from these same tensors, so the Grams
        # stay mutually consistent
        self.inputs = inputs
        self.sqrt_at_output = sqrt
        self.weight_columns = weight_columns
        self.has_bias = has_bias
        self.sample_matrices = torch.einsum(
            "nto,nti->noi", output_grads, inputs.to(output_grads.dtype)
        )
        per_sample = to_parameter_order(self.sample_matrices, weight_columns, has_bias)
        sqrt_matrices = torch.einsum("rnto,nti->rnoi", sqrt, inputs)
        flat_sqrt = to_parameter_order(sqrt_matrices, weight_columns, has_bias)
        super().__init__(per_sample, flat_sqrt.reshape(-1, per_sample.shape[1]), dtype)

    def kronecker(self) -> KroneckerFactors:  # noqa: D102
        n, t, i = self.inputs.shape
        x = self.inputs.reshape(n * t, i).to(self.dtype) / n**0.5
        s = self.sqrt_at_output.reshape(-1, self.sqrt_at_output.shape[-1]).to(self.dtype) / t**0.5
        return KroneckerFactors(
            input_factor=x.T @ x,
            output_factor=s.T @ s,
            samples=self.sample_matrices.to(self.dtype),
            input_root=x,
            output_root=s,
            order=lambda matrix: to_parameter_order(matrix, self.weight_columns, self.has_bias),
        )
