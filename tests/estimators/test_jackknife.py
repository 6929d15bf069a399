"""The jackknife over replicate groups, and the sketch design."""

from __future__ import annotations

import math

import pytest
import torch

from fisher_monitor.engine import cost
from fisher_monitor.estimators import SketchDesign, jackknife, pair_means


def test_jackknife_of_a_mean_is_the_mean_with_its_standard_error():
    """For a linear statistic the correction vanishes and v_J is the variance of the mean."""
    values = torch.tensor([1.0, 2.5, 0.5, 4.0, 3.0], dtype=torch.float64)
    g = len(values)
    full = float(values.mean())
    leave_one_out = [float((values.sum() - v) / (g - 1)) for v in values]
    estimate = jackknife(full, leave_one_out)
    assert estimate.value == pytest.approx(full, abs=1e-12)
    assert estimate.stderr == pytest.approx(float(values.std() / g**0.5), rel=1e-12)


def test_jackknife_turns_a_squared_mean_into_the_u_statistic():
    """θ = (mean x)²: θ_J = mean over distinct pairs of x_g x_h (unbiased for μ²)."""
    values = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    g = len(values)
    full = float(values.mean() ** 2)
    leave_one_out = [float(((values.sum() - v) / (g - 1)) ** 2) for v in values]
    pairs = sum(float(a * b) for i, a in enumerate(values) for j, b in enumerate(values) if i != j)
    assert jackknife(full, leave_one_out).value == pytest.approx(pairs / (g * (g - 1)), abs=1e-12)


def test_pair_means_are_u_statistics_per_replicate():
    generator = torch.Generator().manual_seed(0)
    pairs = torch.rand(5, 5, generator=generator, dtype=torch.float64)
    pairs = pairs + pairs.T
    means = pair_means(pairs)
    for index, subset in enumerate(
        [range(5)] + [[g for g in range(5) if g != i] for i in range(5)]
    ):
        distinct = [float(pairs[a, b]) for a in subset for b in subset if a != b]
        assert float(means[index]) == pytest.approx(sum(distinct) / len(distinct), rel=1e-12)


def test_jackknife_needs_two_groups_and_passes_nan_through():
    with pytest.raises(ValueError, match="at least 2 groups"):
        jackknife(1.0, [1.0])
    assert math.isnan(jackknife(float("nan"), [1.0, 2.0]).value)
    assert jackknife(3.0, [3.0, 3.0, 3.0]).stderr is None  # no randomness: no standard error


def test_sketch_design_is_validated():
    with pytest.raises(ValueError, match="at least 3 replicate groups"):
        SketchDesign(groups=2)
    with pytest.raises(ValueError, match="at least 1 column"):
        SketchDesign(columns_per_group=0)
    with pytest.raises(ValueError, match="Invalid estimator: 'fast'"):
        cost.check_estimator("fast")
