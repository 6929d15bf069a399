"""Diagonals and mean gradient of a Linear layer: two fused float32 products, no underflow."""

from __future__ import annotations

import pytest
import torch

from fisher_monitor.factors import OuterProductFactors
from fisher_monitor.factors.outer_product import SAMPLE_CHUNK
from fisher_monitor.linalg import power_of_two_scale

F64 = torch.float64


def factors(scale: float = 1.0, seed: int = 0, samples: int = 40):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 7, generator=g)
    inputs = torch.cat([x, torch.ones(samples, 1)], dim=1)
    grads = scale * torch.randn(samples, 5, generator=g, dtype=F64)
    sqrt = scale * torch.randn(3, samples, 5, generator=g)
    return OuterProductFactors(inputs, grads, sqrt, weight_columns=7, has_bias=True)


def reference(f: OuterProductFactors):
    x, d, s = f.inputs, f.output_grads, f.sqrt  # float64 copies
    n = f.num_samples
    return (
        f._order(s.square().sum(dim=0).T @ x.square()),
        f._order(d.square().T @ x.square() / n),
        f._order(d.T @ x / n),
    )


def magnitudes(f: OuterProductFactors):
    """The same sums over the terms' absolute values: what float32 rounding is relative to."""
    x, d, s = f.inputs.abs(), f.output_grads.abs(), f.sqrt
    n = f.num_samples
    return (
        f._order(s.square().sum(dim=0).T @ x.square()),
        f._order(d.square().T @ x.square() / n),
        f._order(d.T @ x / n),
    )


def assert_float32_accurate(f: OuterProductFactors, got, expected) -> None:
    """Within float32's error bound for products summed over at most SAMPLE_CHUNK samples.

    ``|fl(Σ aₙ) − Σ aₙ| ≤ γ Σ |aₙ|`` with ``γ = (k + 4) ε₃₂`` for ``k`` terms summed in
    float32 (the inputs rounded to float32, a product, a square and a power-of-two scale
    add the 4); chunks are summed in float64. A gradient entry may cancel, so the bound is
    against the absolute terms, not the value.
    """
    k = min(f.num_samples, SAMPLE_CHUNK)
    gamma = (k + 4) * torch.finfo(torch.float32).eps
    for value, reference_value, size in zip(got, expected, magnitudes(f), strict=True):
        assert value.dtype == F64
        assert bool((reference_value != 0).all())
        error = (value - reference_value).abs()
        assert bool((error <= gamma * size).all()), float((error / size).max())


@pytest.mark.parametrize("scale", [1.0, 1e-22])
def test_fused_diagonals_and_gradient_match_float64(scale):
    """Output gradients of 1e-22 square to 1e-44, below float32's denormals: scaled first."""
    f = factors(scale)
    fisher, empirical = f.diagonals()
    gradient = f.mean_gradient()
    assert_float32_accurate(f, (fisher, empirical, gradient), reference(f))


def test_many_samples_are_summed_in_float64_chunks():
    f = factors(samples=600)
    assert_float32_accurate(f, (*f.diagonals(), f.mean_gradient()), reference(f))


def test_power_of_two_scale():
    values = torch.tensor([3e-21, -1e-20])
    scale = power_of_two_scale(values)
    assert scale == 2.0 ** round(__import__("math").log2(scale))  # exact
    assert 2.0**19 <= float((values * scale).abs().max()) < 2.0**20
    assert power_of_two_scale(torch.zeros(3)) == 1.0
