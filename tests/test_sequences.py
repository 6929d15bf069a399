"""Outputs with extra positions: F and EF of the same per-sample likelihood.

Cross-entropy over ``(N, C, T)`` (a sequence model, a per-pixel classifier) and MSE over
``(N, K, T)``: a sample's NLL covers all its positions (the theory page,
docs/theory.md#extra-positions), so F and EF do not depend on the reduction and their
ratios not on T.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reference
from fisher_monitor import measure

RTOL, ATOL = 1e-7, 1e-10


def sequence_model(channels_out: int) -> nn.Module:
    """(N, 2, T) → (N, C, T): position-wise layers and one that mixes neighbours."""
    return nn.Sequential(
        nn.Conv1d(2, 4, kernel_size=3, padding=1), nn.Tanh(), nn.Conv1d(4, channels_out, 1)
    ).double()


def problem(loss: str, n: int = 7, positions: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = sequence_model(3)
    inputs = torch.randn(n, 2, positions, generator=generator, dtype=torch.float64)
    if loss == "ce":
        targets = torch.randint(0, 3, (n, positions), generator=generator)
    else:
        targets = torch.randn(n, 3, positions, generator=generator, dtype=torch.float64)
    return model, inputs, targets


def losses(name: str, reduction: str) -> nn.Module:
    if name == "ce":
        return nn.CrossEntropyLoss(reduction=reduction)
    return nn.MSELoss(reduction=reduction)


@pytest.mark.parametrize("backend", ["backpack", "functorch"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_name", ["ce", "mse"])
def test_extra_positions_match_the_reference(loss_name, reduction, backend):
    model, inputs, targets = problem(loss_name)
    loss = losses(loss_name, reduction)
    expected = reference.diag_and_block_metrics(model, loss, inputs, targets)
    result = measure(model, loss, inputs, targets, backend=backend, structures=("diag", "block"))
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=RTOL, abs=ATOL), key


def test_cross_entropy_reductions_give_the_same_fisher_and_ef():
    model, inputs, targets = problem("ce")
    kwargs = dict(structures=("diag", "block"), keep_blocks=True)
    mean = measure(model, nn.CrossEntropyLoss(), inputs, targets, **kwargs)
    total = measure(model, nn.CrossEntropyLoss(reduction="sum"), inputs, targets, **kwargs)
    for name in mean.blocks:
        for a, b in zip(mean.blocks[name], total.blocks[name], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    # and the per-sample NLL is the sum over positions: 4 positions, not their mean
    per_sample = reference.per_sample_gradients(model, nn.CrossEntropyLoss(), inputs, targets)
    torch.testing.assert_close(mean.blocks["2"][2], per_sample.mean(0)[-15:])


@pytest.mark.montecarlo
@pytest.mark.parametrize("backend", ["backpack", "functorch"])
def test_monte_carlo_fisher_agrees_with_exact_in_expectation(backend):
    """tr F from sampled labels (8 independent measurements of 200 labels per position and
    sample) against the exact trace: |mean − exact| < 5 standard errors of the mean."""
    model, inputs, targets = problem("ce", n=5)
    loss = nn.CrossEntropyLoss()
    exact = measure(model, loss, inputs, targets, backend=backend, structures=("diag",))
    exact_trace = sum(float(f.sum()) for f, _ in exact.diagonals.values())
    traces = []
    for seed in range(8):
        m = measure(
            model,
            loss,
            inputs,
            targets,
            backend=backend,
            structures=("diag",),
            fisher="mc",
            mc_samples=200,
            generator=torch.Generator().manual_seed(seed),
        )
        traces.append(sum(float(f.sum()) for f, _ in m.diagonals.values()))
    values = torch.tensor(traces, dtype=torch.float64)
    stderr = values.std() / len(traces) ** 0.5
    assert abs(float(values.mean()) - exact_trace) < 5 * float(stderr)
    assert abs(float(values.mean()) - exact_trace) < 0.05 * exact_trace  # not a vacuous bound


@pytest.mark.montecarlo
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_well_specified_sequence_model_has_trace_ratio_near_one(reduction):
    """Labels drawn from the model itself at each of T = 4 positions, N = 3000: tr EF / tr F
    is an average of N i.i.d. ratios' numerators, so it concentrates at 1 with a standard
    deviation of a few percent; the tolerance 0.1 is several of those (0.25 = 1/T would be
    the old bug)."""
    torch.manual_seed(3)
    model = sequence_model(3)
    generator = torch.Generator().manual_seed(4)
    inputs = torch.randn(3000, 2, 4, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        probs = model(inputs).softmax(dim=1)  # (N, C, T)
    flat = probs.permute(0, 2, 1).reshape(-1, 3)
    targets = torch.multinomial(flat, 1, generator=generator).reshape(3000, 4)
    m = measure(
        model, nn.CrossEntropyLoss(reduction=reduction), inputs, targets, structures=("diag",)
    )
    assert m["diag/trace_ratio/all"] == pytest.approx(1.0, abs=0.1)
