"""Squares of float32 factors stay in float32's range, however small or large the factors.

Gradients of 1e-10 and less are common at initialisation (MobileNetV3's depthwise
convolutions, a head behind zero-initialised scales); their Gram matrices' entries near 1e-23
square to 1e-46, below float32's smallest number. Squares taken in float32 are scaled by a
power of two first (exact), so sums of squares keep float32's relative precision.
"""

from __future__ import annotations

import pytest
import torch

from fisher_monitor.factors.materialized import MaterializedFactors
from fisher_monitor.linalg import column_square_norms, square_norm

F64 = torch.float64
SCALES = [1e-23, 1e-20, 1e-12, 1.0, 1e19]


@pytest.mark.parametrize("scale", SCALES)
def test_square_norms_of_float32_matrices_keep_their_digits(scale):
    matrix = torch.randn(60, 40, dtype=F64, generator=torch.Generator().manual_seed(0)) * scale
    single = matrix.float()
    exact = single.double()  # the same numbers, squared in float64
    assert float(square_norm(single)) == pytest.approx(float(exact.square().sum()), rel=1e-6)
    torch.testing.assert_close(
        column_square_norms(single), exact.square().sum(dim=0), rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("scale", SCALES)
def test_materialised_diagonals_of_float32_factors_keep_their_digits(scale):
    g = torch.Generator().manual_seed(1)
    per_sample = (torch.randn(8, 30, dtype=F64, generator=g) * scale).float()
    sqrt = (torch.randn(24, 30, dtype=F64, generator=g) * scale).float()
    fisher, empirical = MaterializedFactors(per_sample, sqrt).diagonals()
    torch.testing.assert_close(fisher, sqrt.double().square().sum(dim=0), rtol=1e-6, atol=0)
    torch.testing.assert_close(
        empirical, per_sample.double().square().mean(dim=0), rtol=1e-6, atol=0
    )
