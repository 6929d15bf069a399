"""Finalisation with a tolerance: rounding is clamped, a numerical failure is an error.

A cosine of 5 must never be logged as 1.0 ("EF equals F"), a KL of −3 never as 0.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import fisher_monitor.structures.block.structure as block_module
from fisher_monitor import FisherMonitor, measure
from fisher_monitor.metrics import DampedStatistics, LayerStatistics, NumericalError, finalize
from lightning_helpers import fit


def statistics(**damped_overrides) -> LayerStatistics:
    """Consistent statistics of a 2-parameter layer (every metric in range)."""
    t = lambda value: torch.tensor(value, dtype=torch.float64)  # noqa: E731
    damped = dict(
        damping_mass=t(0.2),
        kl=t(0.5),
        grad_sq=t(1.0),
        nat_sq=t(4.0),
        ef_sq=t(9.0),
        nat_ef=t(3.0),
        nat_projection=t(1.5),
        ef_projection=t(0.8),
        ef_projection_per_sample=t(1.2),
    )
    damped.update({k: t(v) for k, v in damped_overrides.items()})
    return LayerStatistics(
        dimension=2,
        trace_f=t(2.0),
        trace_ef=t(1.0),
        frob_f_sq=t(2.0),
        frob_ef_sq=t(1.0),
        inner=t(1.0),
        frob_diff_sq=t(1.0),
        damped=[DampedStatistics(**damped)],
    )


def test_values_in_range_are_finalised():
    metrics = finalize(statistics(), [0.1])
    assert metrics["direction_cosine"] == pytest.approx(3.0 / (2.0 * 3.0))
    assert metrics["kl"] == 0.5


@pytest.mark.parametrize(
    ("override", "metric"),
    [
        (dict(nat_ef=30.0), "direction_cosine = 5.0"),  # ‖A⁻¹g‖‖B⁻¹g‖ = 6
        (dict(nat_projection=-4.0), "nat_grad_cosine"),
        (dict(kl=-3.0), "kl = -3.0"),
        (dict(ef_projection=-0.5), "ef_projection = -0.5"),
    ],
)
def test_out_of_range_values_fail_with_the_layer_named(override, metric):
    with pytest.raises(NumericalError, match=f"in block/fc1: {metric}"):
        finalize(statistics(**override), [0.1], where="block/fc1")


def test_matrix_cosine_of_seven_fails():
    corrupted = statistics()
    corrupted.inner = torch.tensor(7.0 * 2.0**0.5, dtype=torch.float64)  # ‖EF‖‖F‖ = √2
    with pytest.raises(NumericalError, match="matrix_cosine = 6.99"):
        finalize(corrupted, [0.1], where="diag/all")


def test_rounding_is_clamped_not_failed():
    hair = statistics(nat_ef=6.0 * (1 + 1e-12), kl=-1e-12)
    metrics = finalize(hair, [0.1])
    assert metrics["direction_cosine"] == 1.0
    assert metrics["kl"] == 0.0
    assert isinstance(NumericalError("x"), FloatingPointError)  # callers skip it like NaN


def corrupt_block(monkeypatch):
    """Make the block structure report an impossible direction cosine (inner product ×5)."""
    original = block_module.Block.layer

    def corrupted(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        for damped in result.statistics.damped:
            damped.nat_ef = 5.0 * (damped.nat_sq * damped.ef_sq).sqrt()
        return result

    monkeypatch.setattr(block_module.Block, "layer", corrupted)


def test_a_corrupted_statistic_fails_the_measurement(monkeypatch):
    corrupt_block(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 8), nn.Tanh(), nn.Linear(8, 3))
    inputs, targets = torch.randn(4, 20), torch.randint(0, 3, (4,))
    with pytest.raises(NumericalError, match=r"in block/0: direction_cosine = (5\.0|4\.99)"):
        measure(model, nn.CrossEntropyLoss(), inputs, targets)


def test_the_callback_warns_and_skips_a_numerical_failure(monkeypatch):
    corrupt_block(monkeypatch)
    monitor = FisherMonitor(every_n_steps=1, structures=("diag", "block"), network="net")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, logger = fit(monitor, steps=3)
    messages = [str(w.message) for w in caught if "FisherMonitor" in str(w.message)]
    assert len(messages) == 1 and "direction_cosine = " in messages[0]
    logged = [key for _, metrics in logger.calls for key in metrics]
    assert not any("/block/" in key or "/diag/" in key for key in logged)


def test_a_vanished_gradient_gives_nan_cosines_not_noise_or_an_error():
    """At ‖g‖ ≤ 1e-10·√tr EF the gradient's direction is rounding noise: cosines are nan."""
    vanished = statistics(grad_sq=1e-21, nat_projection=1e-20, ef_projection=1e-21, nat_ef=30.0)
    metrics = finalize(vanished, [0.1], where="block/fc1")
    for name in ("direction_cosine", "nat_grad_cosine", "ef_grad_cosine"):
        assert metrics[name] != metrics[name]  # nan
    assert metrics["trace_ratio"] == 0.5 and metrics["kl"] == 0.5
    # just above the resolution the same noise is a numerical failure again
    with pytest.raises(NumericalError, match="direction_cosine"):
        finalize(statistics(grad_sq=1e-19, nat_ef=30.0), [0.1], where="block/fc1")


def test_measuring_at_an_exact_optimum_reports_nan_directions():
    """Logistic regression at its float64 optimum (Newton): the gradient is rounding noise."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(2000, 2, dtype=torch.float64, generator=generator)
    odds = torch.sigmoid(inputs[:, :1] - 0.5 * inputs[:, 1:])
    labels = (torch.rand(2000, 1, dtype=torch.float64, generator=generator) < odds).double()
    features = torch.cat([inputs, torch.ones(2000, 1, dtype=torch.float64)], dim=1)

    def loss(theta):
        return nn.functional.binary_cross_entropy_with_logits(features @ theta[:, None], labels)

    theta = torch.zeros(3, dtype=torch.float64)
    for _ in range(30):
        step = torch.linalg.solve(torch.func.hessian(loss)(theta), torch.func.grad(loss)(theta))
        theta = theta - step
    assert torch.func.grad(loss)(theta).norm() < 1e-13  # the optimum, to rounding

    model = nn.Linear(2, 1).double()
    with torch.no_grad():
        model.weight.copy_(theta[:2][None])
        model.bias.copy_(theta[2:])
    m = measure(model, nn.BCEWithLogitsLoss(), inputs, labels, structures=("diag", "block"))
    for structure in ("diag", "block"):
        for name in ("direction_cosine", "nat_grad_cosine", "ef_grad_cosine"):
            value = m[f"{structure}/{name}/all"]
            assert value != value, f"{structure}/{name} = {value}, expected nan"
    # the undamped comparison is unaffected: tr EF / tr F from the dense definitions
    probabilities = torch.sigmoid(features @ theta[:, None])
    per_sample = (probabilities - labels) * features
    fisher_trace = (probabilities * (1 - probabilities) * features.square()).sum() / 2000
    assert m["block/trace_ratio/all"] == pytest.approx(
        (per_sample.square().sum() / 2000 / fisher_trace).item(), rel=1e-10
    )


def test_a_vanished_gradient_on_the_gram_route_gives_nan_cosines():
    """U = VB with V(Ba) = 0 up to rounding: on the Gram route ‖g‖² = bᵀK_Vb is only known to
    about ε√D max K_ii ‖b‖², far above 1e-20·tr EF; that error decides, not a range check."""
    from fisher_monitor.factors import CoefficientMatrix
    from fisher_monitor.structures.block.gram_route import gram_block_statistics
    from fisher_monitor.structures.block.root_route import root_block_statistics

    generator = torch.Generator().manual_seed(0)
    dimension, per_sample, n = 50, 2, 40
    v = torch.randn(dimension, per_sample * n, dtype=torch.float64, generator=generator)
    null = torch.linalg.svd(v, full_matrices=True).Vh[dimension:]  # rows with V x = 0
    b = null.T @ torch.randn(null.shape[0], dtype=torch.float64, generator=generator)
    coefficients = CoefficientMatrix(b.view(per_sample, n) * n**0.5)  # B a = b
    dense = coefficients.dense()
    gram_v = v.T @ v
    gram = gram_block_statistics(
        dense.T @ gram_v @ dense, gram_v, dense.T @ gram_v, dimension, [1e-3], coefficients
    ).statistics
    root = root_block_statistics(v, dimension, [1e-3], coefficients=coefficients).statistics
    assert gram.damped[0].grad_sq > 1e-20 * gram.trace_ef  # above the fixed threshold
    for statistics in (gram, root):
        metrics = finalize(statistics, [1e-3], where="block/fc")
        for name in ("direction_cosine", "nat_grad_cosine", "ef_grad_cosine"):
            assert metrics[name] != metrics[name], name
        assert math.isfinite(metrics["trace_ratio"]) and metrics["kl"] >= 0.0


def test_every_metric_name_has_one_definition():
    """keys.py (the API names) and the registry of definitions agree."""
    from fisher_monitor import keys
    from fisher_monitor.metrics import DAMPED, UNDAMPED

    assert set(UNDAMPED) | set(DAMPED) == set(keys.METRICS)
    assert not set(UNDAMPED) & set(DAMPED)
    assert set(DAMPED) <= set(keys.DAMPED_METRICS) and not set(UNDAMPED) & set(keys.DAMPED_METRICS)
    assert set(keys.METRICS) <= set(keys.DESCRIPTIONS)
