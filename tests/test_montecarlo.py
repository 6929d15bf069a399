"""The Monte-Carlo Fisher: unbiased, convergent, reproducible, consistent across structures."""

from __future__ import annotations

import pytest
import torch

import reference
from cases import make_problem
from fisher_monitor import measure

pytestmark = pytest.mark.montecarlo


@pytest.mark.parametrize("loss_name", ["ce", "mse3", "bce"])
@pytest.mark.slow
def test_mc_fisher_diagonal_is_unbiased(loss_name):
    """Mean of K one-sample MC diagonals vs the exact diagonal: a z-test per entry.

    Each run draws fresh labels (a generator advanced between runs). With K = 300 runs,
    z = (mean − exact)/(std/√K) is approximately standard normal per entry; we require
    max |z| < 5 over ≤ 60 entries (false-alarm probability < 60 · 6e-7 with independent
    entries; the seed is fixed, so the test is deterministic).
    """
    model, inputs, targets, case = make_problem("mlp", loss_name, n=5, seed=11)
    loss = case.module("mean")
    exact = measure(model, loss, inputs, targets, structures=("diag",))
    generator = torch.Generator().manual_seed(123)
    runs = []
    for _ in range(300):
        m = measure(
            model, loss, inputs, targets, structures=("diag",), fisher="mc", generator=generator
        )
        runs.append(torch.cat([m.diagonals[name][0] for name in m.layer_names]))
    samples = torch.stack(runs)
    target = torch.cat([exact.diagonals[name][0] for name in exact.layer_names])
    std = samples.std(dim=0)
    informative = std > 1e-12 * target.abs().max()
    z = (samples.mean(dim=0) - target)[informative] / (std[informative] / len(runs) ** 0.5)
    assert z.abs().max() < 5.0
    # entries with no variance must be exact (e.g. dead ReLU units give zeros in both)
    torch.testing.assert_close(
        samples.mean(0)[~informative], target[~informative], atol=1e-12, rtol=0
    )


def test_mc_fisher_matches_sampled_reference_in_distribution():
    """Our MC Fisher and a brute-force sampler (torch.func) agree within sampling error.

    Both average M = 2000 sampled labels per input; each block entry then has a standard
    error of about |F|/√(N·M) ≈ 1% of the trace scale. We compare traces within 5%.
    """
    model, inputs, targets, case = make_problem("mlp", "ce", n=5, seed=12)
    loss = case.module("mean")
    m = measure(
        model,
        loss,
        inputs,
        targets,
        structures=("block",),
        fisher="mc",
        mc_samples=2000,
        generator=torch.Generator().manual_seed(1),
    )
    ref = reference.sampled_fisher(
        model, "cross_entropy", inputs, 2000, torch.Generator().manual_seed(2)
    )
    exact = reference.fisher(model, loss, inputs, targets)
    ef_trace = float(
        torch.trace(
            reference.empirical_fisher(reference.per_sample_gradients(model, loss, inputs, targets))
        )
    )
    mc_trace = ef_trace / m["block/trace_ratio/all"]
    assert mc_trace == pytest.approx(float(torch.trace(ref)), rel=0.05)
    assert mc_trace == pytest.approx(float(torch.trace(exact)), rel=0.05)


@pytest.mark.parametrize("loss_name", ["ce", "mse3", "bce"])
def test_many_samples_converge_to_exact_metrics(loss_name):
    """With M = 4000 labels per input, MC metrics approach the exact ones.

    The MC Fisher's relative error is O(1/√(N·M)) ≈ 0.7% here; undamped metrics must agree
    within 5%, cosines within 0.05.
    """
    model, inputs, targets, case = make_problem("mlp", loss_name, n=5, seed=13)
    loss = case.module("mean")
    exact = measure(model, loss, inputs, targets, structures=("diag", "block", "kron"))
    mc = measure(
        model,
        loss,
        inputs,
        targets,
        structures=("diag", "block", "kron"),
        fisher="mc",
        mc_samples=4000,
        generator=torch.Generator().manual_seed(7),
    )
    for structure in ("diag", "block", "kron"):
        for metric in ("trace_ratio", "rel_error", "matrix_cosine"):
            key = f"{structure}/{metric}/all"
            assert mc[key] == pytest.approx(exact[key], rel=0.05), key
        key = f"{structure}/direction_cosine/all"
        assert mc[key] == pytest.approx(exact[key], abs=0.05), key
    # with absolute damping the EF side does not depend on the Fisher at all
    kwargs = dict(structures=("block",), damping=1e-3, damping_mode="absolute")
    exact = measure(model, loss, inputs, targets, **kwargs)
    mc = measure(model, loss, inputs, targets, fisher="mc", generator=torch.Generator(), **kwargs)
    for metric in ("ef_grad_cosine", "ef_projection", "ef_projection_per_sample"):
        assert mc[f"block/{metric}/all"] == pytest.approx(exact[f"block/{metric}/all"], rel=1e-12)


def test_fixed_generator_reproduces_and_fresh_samples_differ():
    model, inputs, targets, case = make_problem("mlp", "ce", seed=14)
    loss = case.module("mean")
    kwargs = dict(structures=("diag", "block", "kron"), fisher="mc", mc_samples=3)
    first = measure(
        model, loss, inputs, targets, generator=torch.Generator().manual_seed(9), **kwargs
    )
    second = measure(
        model, loss, inputs, targets, generator=torch.Generator().manual_seed(9), **kwargs
    )
    assert first.scalars.keys() == second.scalars.keys()
    for key in first.scalars:
        if key != "probe/seconds":
            assert first[key] == second[key], key
    other = measure(
        model, loss, inputs, targets, generator=torch.Generator().manual_seed(10), **kwargs
    )
    assert other["block/trace_ratio/all"] != first["block/trace_ratio/all"]


def test_one_draw_serves_every_structure():
    """diag, block and kron of one MC measurement use the same sampled labels."""
    model, inputs, targets, case = make_problem("mlp", "ce", seed=15)
    loss = case.module("mean")
    m = measure(
        model,
        loss,
        inputs,
        targets,
        structures=("diag", "block"),
        fisher="mc",
        generator=torch.Generator().manual_seed(3),
    )
    # tr F is the same number for the diagonal and the blocks only if the labels coincide
    assert m["diag/trace_ratio/all"] == pytest.approx(m["block/trace_ratio/all"], rel=1e-12)
