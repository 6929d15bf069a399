"""Fitted float32 networks: the numbers of the float32 network equal those of its float64 copy.

Once a network fits its training data, p(y|f) → 1 and the residuals (p_y − 1, σ − y) lose
their digits in float32; the per-sample gradients then leave the range of the Fisher's
square root and (F + λI)⁻¹ amplifies the rounding by up to σ/λ ≈ 1e8 (the block direction
cosine read 0.01 where the float64 copy gave 0.41). The loss side is computed in float64
from the outputs and the per-sample gradients are exact combinations of the Fisher's
square-root columns, so every metric of the float32 network agrees with the float64 copy
(tolerance: 1e-3 relative, plus 1e-5 absolute for values that are zero up to rounding).
"""

from __future__ import annotations

import copy

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import reference
from fisher_monitor import measure

STRUCTURES = ("diag", "block", "kron")


def _digits():
    data, labels = load_digits(return_X_y=True)
    return torch.tensor(data[:256] / 16.0, dtype=torch.float32), torch.tensor(labels[:256])


def _fit(model: nn.Module, loss_fn: nn.Module, inputs, targets, steps: int) -> nn.Module:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(inputs), targets).backward()
        optimizer.step()
    return model


def _mlp(outputs: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, outputs)
    )


@pytest.fixture(scope="module")
def fitted():
    """Three networks trained into the fitted regime (train loss ≤ 1e-3), with their data."""
    inputs, labels = _digits()
    cases = {}
    ce = nn.CrossEntropyLoss()
    cases["ce"] = (_fit(_mlp(10), ce, inputs, labels, 300), ce, inputs, labels)
    binary = (labels % 2).to(torch.float32).unsqueeze(1)
    bce = nn.BCEWithLogitsLoss()
    cases["bce"] = (_fit(_mlp(1), bce, inputs, binary, 300), bce, inputs, binary)
    targets = nn.functional.one_hot(labels, 10).to(torch.float32)
    mse = nn.MSELoss()
    cases["mse"] = (_fit(_mlp(10), mse, inputs, targets, 300), mse, inputs, targets)
    for model, loss_fn, x, y in cases.values():
        with torch.no_grad():
            assert float(loss_fn(model(x), y)) < 1e-3  # the regime the test is about
    return cases


def _agree(result, expected, where):
    for key, value in expected.scalars.items():
        if key == "probe/seconds":
            continue
        got = result[key]
        assert abs(got - value) <= 1e-3 * abs(value) + 1e-5, (where, key, got, value)


@pytest.mark.slow
@pytest.mark.parametrize("fisher", ["exact", "mc"])
@pytest.mark.parametrize("name", ["ce", "bce", "mse"])
def test_float32_network_agrees_with_its_float64_copy(fitted, name, fisher):
    model, loss_fn, inputs, targets = fitted[name]
    double = copy.deepcopy(model).double()
    x, y = inputs[:64], targets[:64]
    y64 = y.double() if y.is_floating_point() else y
    for backend, structures in (("backpack", STRUCTURES), ("functorch", ("diag", "block"))):
        kwargs = dict(structures=structures, fisher=fisher, backend=backend)
        single = measure(model, loss_fn, x, y, generator=torch.Generator().manual_seed(1), **kwargs)
        reference = measure(
            double, loss_fn, x.double(), y64, generator=torch.Generator().manual_seed(1), **kwargs
        )
        _agree(single, reference, (name, fisher, backend))


@pytest.mark.slow
def test_fitted_block_direction_is_not_a_rounding_artefact(fitted):
    """The headline number of the issue: in the fitted regime the float32 network's block
    direction cosine is the float64 one, and far from the ~0 that rounding produced."""
    model, loss_fn, inputs, targets = fitted["ce"]
    double = copy.deepcopy(model).double()
    single = measure(model, loss_fn, inputs[:64], targets[:64])
    reference = measure(double, loss_fn, inputs[:64].double(), targets[:64])
    key = "block/direction_cosine/all"
    assert single[key] == pytest.approx(reference[key], abs=1e-4)
    assert reference[key] > 0.1


@pytest.mark.parametrize("backend", ["backpack", "functorch"])
def test_saturated_probabilities_use_the_observed_residuals(backend):
    """A logit of −3000 with label 1: σ(1 − σ) underflows in float64, so the Fisher's square
    root is 0 there and no finite coefficient reproduces the residual −1. The measurement
    says so and still matches the reference (F, EF and g from their definitions)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 1)).double()
    inputs = torch.randn(8, 3, dtype=torch.float64)
    targets = torch.randint(0, 2, (8, 1)).to(torch.float64)
    with torch.no_grad():
        weight = model[0].weight[0]
        inputs[0] = (-3000.0 - model[0].bias) * weight / weight.square().sum()
    targets[0] = 1.0  # sample 0: logit −3000, label 1
    loss = nn.BCEWithLogitsLoss()
    result = measure(model, loss, inputs, targets, backend=backend)
    assert any("saturated" in note and "observed residuals" in note for note in result.notes)
    expected = reference.diag_and_block_metrics(model, loss, inputs, targets)
    for key in ("diag/trace_ratio/all", "block/ef_projection/all", "block/rel_error/all"):
        assert result[key] == pytest.approx(expected[key], rel=1e-9, nan_ok=True), key
