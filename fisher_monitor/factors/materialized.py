"""Factors of a layer that BackPACK has no structured form for: ``U`` and ``V`` stored whole.

Every layer measured with ``torch.func``, and every layer type other than ``Linear`` and
convolutions on BackPACK (BatchNorm, LayerNorm, embeddings, …), gets its per-sample
gradients and square-root columns as explicit ``N × D`` and ``R × D`` matrices.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fisher_monitor.factors.base import LayerFactors
from fisher_monitor.factors.shape import CURVATURE_BYTES, RATES, LayerShape, PassSize
from fisher_monitor.linalg import power_of_two_scale, symmetric_product


def _scaled_squares(values: Tensor, dtype: torch.dtype) -> Tensor:
    """``values²`` in ``dtype``, squared in ``values``' precision without leaving its range."""
    if values.dtype == torch.float64:
        return values.square().to(dtype)
    scale = power_of_two_scale(values)
    return (values * scale).square().to(dtype) / scale**2


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
        # squares in the factors' precision, of entries brought near 2^20 by a power of two
        # (exact): a float32 gradient of 1e-20 squares to a denormal, of 1e-23 to zero
        return (
            _scaled_squares(self.sqrt, self.dtype).sum(dim=0),
            _scaled_squares(self.per_sample, self.dtype).mean(dim=0),
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

    mixed_precision = True

    def gram_v_in(self, dtype: torch.dtype, out: Tensor) -> Tensor:  # noqa: D102
        return symmetric_product(self.sqrt.to(dtype), out)

    def gram_v_product(self, weights: Tensor) -> Tensor:  # noqa: D102
        _, v = self._casted()
        return v @ (v.T @ weights.to(self.dtype))

    def gram_v_diagonal(self) -> Tensor:  # noqa: D102
        return torch.linalg.vector_norm(self._casted()[1], dim=1).square()

    def dense_blocks(self) -> tuple[Tensor, Tensor, Tensor]:  # noqa: D102
        u, v = self._casted()
        return v.T @ v, u.T @ u / self.num_samples, u.mean(dim=0)

    def fisher_block(self) -> Tensor:  # noqa: D102
        v = self._casted()[1]
        return v.T @ v

    def sample_columns(self) -> Tensor:  # noqa: D102
        return self._casted()[0].T / self.num_samples**0.5

    def v_combination(self, weights: Tensor) -> Tensor:  # noqa: D102
        return weights.to(self.dtype) @ self._casted()[1]

    def u_combination(self, weights: Tensor) -> Tensor:  # noqa: D102
        return weights.to(self.dtype) @ self._casted()[0] / self.num_samples**0.5

    @classmethod
    def pass_flops(cls, shape: LayerShape, size: PassSize) -> float:  # noqa: D102
        # the per-sample pull-backs (per position), then the squares of every column
        d, n, r = float(shape.dimension), float(size.samples), float(size.rank)
        pulls = 2.0 * (r + n) * d * shape.positions + 2.0 * (r + n) * d
        return pulls + 4.0 * RATES.entry * d + RATES.entry * (r + n) * d / 8.0

    @classmethod
    def gram_flops(cls, shape: LayerShape, size: PassSize) -> float:  # noqa: D102
        n, r = float(size.samples), float(size.rank)
        return RATES.gemm64 * 2.0 * (r * r + 2.0 * n * r) * shape.dimension

    @classmethod
    def factor_bytes(cls, shape: LayerShape, size: PassSize) -> int:  # noqa: D102
        d, dim, n = CURVATURE_BYTES, shape.dimension, size.samples
        # diagonals and their temporaries, the parameter Jacobian's columns and their copy,
        # the per-sample gradients in float64
        return 4 * dim * d + 2 * size.pass_columns * n * dim * size.itemsize + n * dim * d

    @classmethod
    def gram_bytes(cls, shape: LayerShape, size: PassSize) -> int:  # noqa: D102
        return (size.rank + size.samples) * shape.dimension * CURVATURE_BYTES  # cast factors


__all__ = ["MaterializedFactors"]
