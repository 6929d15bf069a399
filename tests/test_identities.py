"""The identities of the theory page (docs/theory.md), each as its own test."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fisher_monitor import measure
from fisher_monitor.backends.backpack import BackpackNetwork
from fisher_monitor.backends.pass_context import seed_from
from fisher_monitor.likelihoods import resolve_loss


def collect_factors(model, loss_fn, inputs, targets, exact=True):
    """Run one pass and keep every layer's factors (test helper)."""
    prepared = BackpackNetwork(model, resolve_loss(loss_fn))
    prepared.sync()
    factors = {}
    try:
        prepared.run(
            inputs,
            targets,
            exact=exact,
            mc_samples=1,
            seed=seed_from(torch.Generator().manual_seed(0)),
            on_layer=lambda info, f: factors.__setitem__(info.name, f),
        )
    finally:
        prepared.close()
    return factors


def matrix_rank(gram: torch.Tensor) -> int:
    eigenvalues = torch.linalg.eigvalsh(gram)
    return int((eigenvalues > 1e-10 * eigenvalues.max()).sum())


def test_softmax_output_layer_rank():
    """Linear(H, C) + softmax: rank F = rank EF = (C−1)(H+1) < C(H+1)."""
    H, C, N = 3, 4, 60
    torch.manual_seed(0)
    model = nn.Linear(H, C).double()
    inputs = torch.randn(N, H, dtype=torch.float64)
    targets = torch.randint(0, C, (N,))
    (layer,) = collect_factors(model, nn.CrossEntropyLoss(), inputs, targets).values()
    assert layer.dimension == C * (H + 1)
    fisher, empirical, _ = layer.dense_blocks()
    assert matrix_rank(fisher) == (C - 1) * (H + 1)
    assert matrix_rank(empirical) == (C - 1) * (H + 1)
    # the per-sample projection sees the same rank as λ → 0
    m = measure(
        model, nn.CrossEntropyLoss(), inputs, targets, damping=1e-10, damping_mode="absolute"
    )
    assert m["block/ef_projection_per_sample/all"] == pytest.approx((C - 1) * (H + 1), abs=1e-4)


def test_per_sample_projection_tends_to_rank():
    """(1/N) Σ g_nᵀ EF⁺ g_n = rank EF: N when N < D (block); non-zero EF_ii count (diag)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3, bias=False)).double()
    N = 4
    inputs = torch.randn(N, 5, dtype=torch.float64)
    targets = torch.randint(0, 3, (N,))
    m = measure(
        model, nn.CrossEntropyLoss(), inputs, targets, damping=1e-12, damping_mode="absolute"
    )
    assert m["block/ef_projection_per_sample/0"] == pytest.approx(N, abs=1e-5)
    assert m["block/ef_projection_per_sample/2"] == pytest.approx(N, abs=1e-5)
    assert m["block/ef_projection_per_sample/all"] == pytest.approx(2 * N, abs=1e-5)
    nonzero = sum(int((ef > 0).sum()) for _, ef in m.diagonals.values())
    assert m["diag/ef_projection_per_sample/all"] == pytest.approx(nonzero, abs=1e-4)
    # and it decreases monotonically as the damping grows
    values = [
        measure(model, nn.CrossEntropyLoss(), inputs, targets, damping=d)[
            "block/ef_projection_per_sample/all"
        ]
        for d in (1e-6, 1e-3, 1e-1, 10.0)
    ]
    assert values == sorted(values, reverse=True)


def test_ef_projection_is_one_when_batch_at_most_dimension():
    """gᵀ EF⁺ g = 1 for N ≤ D with independent g_n (here per layer and overall)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    N = 5
    inputs = torch.randn(N, 6, dtype=torch.float64)
    targets = torch.randint(0, 2, (N,))
    m = measure(
        model, nn.CrossEntropyLoss(), inputs, targets, damping=1e-12, damping_mode="absolute"
    )
    assert m["block/ef_projection/0"] == pytest.approx(1.0, abs=1e-6)
    # with larger N than D the projection stays in [0, 1]
    inputs = torch.randn(400, 6, dtype=torch.float64)
    targets = torch.randint(0, 2, (400,))
    m = measure(
        model, nn.CrossEntropyLoss(), inputs, targets, damping=1e-12, damping_mode="absolute"
    )
    assert 0.0 <= m["block/ef_projection/2"] <= 1.0


def test_logistic_regression_at_zero_logits_fisher_equals_empirical_fisher():
    """Zero logits: F = EF = ¼ X̃ᵀX̃/N exactly, for Bernoulli and two-class softmax alike."""
    torch.manual_seed(3)
    N, d = 50, 4
    inputs = torch.randn(N, d, dtype=torch.float64)
    augmented = torch.cat([inputs, torch.ones(N, 1, dtype=torch.float64)], dim=1)
    expected = 0.25 * augmented.T @ augmented / N
    model = nn.Linear(d, 1).double()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    targets = torch.randint(0, 2, (N, 1)).to(torch.float64)
    m = measure(
        model, nn.BCEWithLogitsLoss(), inputs, targets, structures=("diag", "block", "kron")
    )
    fisher_diag, ef_diag = m.diagonals["(root)"]
    permuted_diag = torch.diagonal(expected)  # weight columns then the bias: already in order
    torch.testing.assert_close(fisher_diag, permuted_diag, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ef_diag, permuted_diag, rtol=1e-12, atol=1e-14)
    for structure in ("diag", "block"):
        assert m[f"{structure}/rel_error/all"] == pytest.approx(0.0, abs=1e-7)
        assert m[f"{structure}/trace_ratio/all"] == pytest.approx(1.0, rel=1e-12)
        assert m[f"{structure}/direction_cosine/all"] == pytest.approx(1.0, abs=1e-9)
        assert m[f"{structure}/kl/all"] == pytest.approx(0.0, abs=1e-9)
    assert m["block/trace_ratio/all"] == pytest.approx(1.0)
    (layer,) = collect_factors(model, nn.BCEWithLogitsLoss(), inputs, targets).values()
    fisher, empirical, _ = layer.dense_blocks()
    torch.testing.assert_close(fisher, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(empirical, expected, rtol=1e-12, atol=1e-14)


def test_linear_regression_closed_forms():
    """MSELoss(mean), one output: F = 2XᵀX/N (any θ, y) and EF = 4 Σ r_n² x_n x_nᵀ/N."""
    torch.manual_seed(4)
    N, d = 40, 3
    inputs = torch.randn(N, d, dtype=torch.float64)
    targets = torch.randn(N, 1, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    (layer,) = collect_factors(model, nn.MSELoss(), inputs, targets).values()
    fisher, empirical, _ = layer.dense_blocks()
    residuals = (model(inputs) - targets).detach().squeeze(1)
    torch.testing.assert_close(fisher, 2 * inputs.T @ inputs / N)
    torch.testing.assert_close(empirical, 4 * (inputs * residuals[:, None] ** 2).T @ inputs / N)


@pytest.mark.montecarlo
@pytest.mark.parametrize("noise_variance", [0.5, 2.0])
def test_linear_regression_ef_tends_to_two_sigma_squared_times_fisher(noise_variance):
    """At the optimum of a well-specified linear model, EF → 2σ²F as N grows.

    With y = xᵀθ* + ε, ε ~ N(0, σ²), and θ = θ*: EF = 4 Σ ε_n² x_n x_nᵀ/N → 4σ² E[xxᵀ] and
    F = 2 Σ x_n x_nᵀ/N → 2 E[xxᵀ]. For x ~ N(0, I₃) the trace ratio is 2 Σ ε²‖x‖²/Σ‖x‖²,
    whose relative standard error is 2/√N ≈ 1.4% at N = 20 000 (Var ε²‖x‖² = 36σ⁴,
    mean 3σ²); the 5% tolerance is 3.5 standard errors (fixed seed). The relative error of
    the well-specified case (σ² = ½) must be small, that of the misspecified variance large.
    """
    generator = torch.Generator().manual_seed(5)
    N, d = 20_000, 3
    theta = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    inputs = torch.randn(N, d, generator=generator, dtype=torch.float64)
    noise = torch.randn(N, 1, generator=generator, dtype=torch.float64) * noise_variance**0.5
    targets = inputs @ theta.T + noise
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(theta)
    m = measure(model, nn.MSELoss(), inputs, targets, structures=("block",))
    assert m["block/trace_ratio/all"] == pytest.approx(2 * noise_variance, rel=0.05)
    if noise_variance == 0.5:
        assert m["block/rel_error/all"] < 0.05
        assert m["block/direction_cosine/all"] > 0.99
    else:
        assert m["block/rel_error/all"] > 2.5  # ‖4σ²Σ − 2Σ‖/‖2Σ‖ = 2σ² − 1 = 3
