"""Each likelihood's loss side against autograd on the per-sample NLL (float64, by definition).

For every likelihood: ``S_n S_nᵀ`` is the Hessian of ``ℓ_n``, the residual is its gradient,
the closed-form coefficients satisfy ``S_n β_n = r_n``, and the sampled residuals have
``E[r̂ r̂ᵀ] = ∇²ℓ_n`` (a statistical test with a stated tolerance).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fisher_monitor.likelihoods import (
    LIKELIHOODS,
    Bernoulli,
    Categorical,
    Gaussian,
    UnsupportedLossError,
    loss_side,
    resolve_loss,
)
from likelihood_cases import CASES, likelihood_case, per_sample_derivatives


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("name", "shape"), CASES)
def test_loss_side_matches_autograd(name, shape, reduction):
    likelihood, loss_fn, outputs, targets = likelihood_case(
        name, reduction, shape, torch.Generator().manual_seed(0)
    )
    likelihood.check_batch(outputs, targets)
    gradient, hess = per_sample_derivatives(loss_fn, outputs, targets)
    roots = likelihood.sqrt_hessian(outputs)
    assert roots.shape[2] == likelihood.fisher_columns(outputs.shape[1:])
    torch.testing.assert_close(roots @ roots.transpose(1, 2), hess, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        likelihood.residuals(outputs, targets), gradient, rtol=1e-12, atol=1e-14
    )
    beta = likelihood.coefficients(outputs, targets)
    rebuilt = (roots @ beta.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(rebuilt, gradient, rtol=1e-10, atol=1e-13)


@pytest.mark.montecarlo
@pytest.mark.parametrize(("name", "shape"), CASES)
def test_sampled_residuals_are_unbiased_for_the_hessian(name, shape):
    """E[r̂ r̂ᵀ] = ∇²ℓ_n. With M = 40000 draws, each entry's standard error is at most
    √(E[(r̂_i r̂_j)²]/M); the tolerance allows 6 of them (|z| < 6), plus 10/M for classes
    too rare to be drawn at all (a class of probability p < 10/M may never appear)."""
    likelihood, loss_fn, outputs, targets = likelihood_case(
        name, "mean", shape, torch.Generator().manual_seed(1)
    )
    _, hess = per_sample_derivatives(loss_fn, outputs, targets)
    samples = 40_000
    torch.manual_seed(2)
    residuals = likelihood.sampled_residuals(outputs, likelihood.draw_noise(outputs, samples))
    estimate = residuals @ residuals.transpose(1, 2)  # the 1/√M of each column averages
    per_draw = residuals * samples**0.5  # (N, K, M) single-draw residuals
    fourth = (per_draw.unsqueeze(2) * per_draw.unsqueeze(1)).square().mean(dim=-1)
    stderr = (fourth / samples).sqrt()
    assert ((estimate - hess).abs() <= 6 * stderr + 10 / samples).all()


def test_fitted_residuals_keep_their_digits():
    """p_y → 1: the residual is p − e_y with the y entry −Σ_{c≠y} p_c, summing to zero
    exactly; the closed-form coefficients reproduce it from the Hessian square root to
    ~ε/(1 − p_y) relative (the Householder basis has entries of order one)."""
    # 1 − p_y ≈ 1e-7 (float32 keeps ~1 digit of it) and ≈ 2e-15 (float64 keeps ~1 digit)
    outputs = torch.tensor([[16.0, 0.0, -3.0], [0.0, 35.0, 1.0]], dtype=torch.float64)
    targets = torch.tensor([0, 1])
    likelihood = Categorical("mean")
    residual = likelihood.residuals(outputs, targets)
    probs = outputs.softmax(dim=1)
    assert float(residual[1, 1]) == pytest.approx(-float(probs[1, 0] + probs[1, 2]), rel=1e-15)
    naive = float(probs[1, 1] - 1)  # float64 p_y − 1 keeps about one digit here
    assert abs(naive - float(residual[1, 1])) > 0.01 * abs(float(residual[1, 1]))
    assert (residual.sum(dim=1).abs() <= 1e-15 * residual.norm(dim=1)).all()
    rebuilt = (
        likelihood.sqrt_hessian(outputs) @ likelihood.coefficients(outputs, targets)[..., None]
    )
    error = (rebuilt.squeeze(-1) - residual).norm(dim=1) / residual.norm(dim=1)
    assert float(error[0]) < 1e-9 and float(error[1]) < 1e-6
    bernoulli = Bernoulli("mean")
    logits = torch.tensor([40.0, -40.0], dtype=torch.float64)
    labels = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert bernoulli.residuals(logits, labels)[:, 0].tolist() == pytest.approx(
        [-torch.sigmoid(torch.tensor(-40.0, dtype=torch.float64)).item()] * 1
        + [torch.sigmoid(torch.tensor(-40.0, dtype=torch.float64)).item()],
        rel=1e-14,
    )


def test_loss_side_columns_and_mc_observed_column():
    likelihood, _, outputs, targets = likelihood_case(
        "cross_entropy", "mean", (5, 4), torch.Generator()
    )
    exact = loss_side(likelihood, outputs, targets, exact=True)
    assert exact.columns.shape == (5, 4, 3) and exact.coefficients.shape == (5, 3)
    noise = likelihood.draw_noise(outputs, 2)
    sampled = loss_side(likelihood, outputs, targets, exact=False, noise=noise)
    assert sampled.fisher_columns == 2 and sampled.observed_column
    torch.testing.assert_close(sampled.columns[:, :, -1], likelihood.residuals(outputs, targets))
    assert sampled.for_backpack(torch.float32).shape == (3, 5, 4)


def test_registry_and_resolution():
    assert set(LIKELIHOODS) == {"cross_entropy", "mse", "bce_with_logits", "nll"}
    assert resolve_loss("mse") == Gaussian("mean")
    assert resolve_loss(nn.CrossEntropyLoss(reduction="sum")) == Categorical("sum")
    with pytest.raises(UnsupportedLossError, match="Unsupported loss 'L1Loss'"):
        resolve_loss(nn.L1Loss())
    with pytest.raises(UnsupportedLossError, match="reduction='none'"):
        resolve_loss(nn.MSELoss(reduction="none"))
    with pytest.raises(UnsupportedLossError, match="label_smoothing"):
        resolve_loss(nn.CrossEntropyLoss(label_smoothing=0.1))


@pytest.mark.parametrize(
    ("likelihood", "outputs", "targets", "match"),
    [
        (Bernoulli("mean"), torch.zeros(4, 2), torch.zeros(4, 2), "single logit per sample"),
        (Bernoulli("mean"), torch.zeros(4, 1), torch.zeros(4), r"targets.unsqueeze\(1\)"),
        (Bernoulli("mean"), torch.zeros(4), torch.zeros(4, 1), r"targets.reshape\(-1\)"),
        (Categorical("mean"), torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), "at least 2"),
        (Gaussian("mean"), torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.long), "floating"),
    ],
)
def test_batches_that_do_not_fit(likelihood, outputs, targets, match):
    with pytest.raises(ValueError, match=match):
        likelihood.check_batch(outputs, targets)
