"""The preconditioner audit against each optimizer's documented update rule.

Each optimizer's denominator is rebuilt here from the gradients it was fed and its
documented update rule; dense F and EF come from :mod:`audit_references`.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from audit_references import (
    LAYERS,
    LOSS,
    TOLERANCE,
    cosine,
    dense,
    hand_measurement,
    make_batch,
    tiny_model,
)
from torch import Tensor, nn

from fisher_monitor.audit import (
    PreconditionerAudit,
    minibatch_second_moment,
    preconditioner_audit,
)


def feed(model: nn.Module, optimizer, batches, l2: float = 0.0) -> list[dict[str, Tensor]]:
    """Step through ``batches``; return the gradient ĝ each step fed the moments.

    ``l2``: L2 weight decay the optimizer adds to the gradient before its moments.
    """
    fed = []
    for x, y in batches:
        optimizer.zero_grad()
        LOSS(model(x), y).backward()
        fed.append(
            {
                n: (p.grad + l2 * p).detach().clone()
                for n, p in model.named_parameters()
                if p.grad is not None
            }
        )
        optimizer.step()
    return fed


def adam_rule(beta2=0.999, eps=1e-8, amsgrad=False, radam=False):
    def denominator(grads: list[Tensor]) -> Tensor:
        v = torch.zeros_like(grads[0])
        v_max = torch.zeros_like(grads[0])
        for g in grads:
            v = beta2 * v + (1 - beta2) * g * g
            v_max = torch.maximum(v_max, v)
        correction = 1 - beta2 ** len(grads)
        if radam:
            return (v.sqrt() + eps) / math.sqrt(correction)
        return ((v_max if amsgrad else v) / correction).sqrt() + eps

    return denominator


def adamax_rule(beta2=0.999, eps=1e-8):
    def denominator(grads):
        u = torch.zeros_like(grads[0])
        for g in grads:
            u = torch.maximum(beta2 * u, g.abs() + eps)
        return u

    return denominator


def adagrad_rule(initial=0.0, eps=1e-10):
    def denominator(grads):
        return (initial + sum(g * g for g in grads)).sqrt() + eps

    return denominator


def rmsprop_rule(alpha=0.99, eps=1e-8, centered=False):
    def denominator(grads):
        a = torch.zeros_like(grads[0])
        m = torch.zeros_like(grads[0])
        for g in grads:
            a = alpha * a + (1 - alpha) * g * g
            m = alpha * m + (1 - alpha) * g
        return ((a - m * m) if centered else a).sqrt() + eps

    return denominator


def adafactor_rule(beta2_decay=-0.8):
    eps1 = torch.finfo(torch.float64).eps

    def denominator(grads):
        if grads[0].dim() > 1:
            rows = torch.zeros(*grads[0].shape[:-1], 1, dtype=torch.float64)
            cols = torch.zeros(1, grads[0].shape[-1], dtype=torch.float64)
            for t, g in enumerate(grads, 1):
                rate = t**beta2_decay
                rows = rows + rate * ((g * g).mean(dim=-1, keepdim=True) - rows)
                cols = cols + rate * ((g * g).mean(dim=-2, keepdim=True) - cols)
            variance = rows @ cols / rows.mean(dim=-2, keepdim=True).clamp(min=eps1)
        else:
            variance = torch.zeros_like(grads[0])
            for t, g in enumerate(grads, 1):
                variance = variance + t**beta2_decay * (g * g - variance)
        return variance.clamp(min=eps1 * eps1).sqrt()

    return denominator


# name -> (optimizer factory, L2 decay added to ĝ, rule, steps)
PRECONDITIONERS = {
    "Adam": (lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.99)), 0.0, adam_rule(0.99), 4),
    "AdamW": (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.5), 0.0, adam_rule(), 4),
    "Adam amsgrad L2": (
        lambda p: torch.optim.Adam(p, lr=5e-2, weight_decay=0.1, amsgrad=True, betas=(0.9, 0.5)),
        0.1,
        adam_rule(0.5, amsgrad=True),
        5,
    ),
    "NAdam": (lambda p: torch.optim.NAdam(p, lr=1e-2), 0.0, adam_rule(), 4),
    "RAdam": (
        lambda p: torch.optim.RAdam(p, lr=1e-2, betas=(0.9, 0.9), eps=1e-3),
        0.0,
        adam_rule(0.9, eps=1e-3, radam=True),
        8,
    ),
    "Adamax": (lambda p: torch.optim.Adamax(p, lr=1e-2), 0.0, adamax_rule(), 4),
    "Adagrad": (
        lambda p: torch.optim.Adagrad(p, lr=0.1, initial_accumulator_value=0.1),
        0.0,
        adagrad_rule(0.1),
        4,
    ),
    "RMSprop": (lambda p: torch.optim.RMSprop(p, lr=1e-2, alpha=0.9), 0.0, rmsprop_rule(0.9), 4),
    "RMSprop centered L2": (
        lambda p: torch.optim.RMSprop(p, lr=1e-2, centered=True, weight_decay=0.1, momentum=0.9),
        0.1,
        rmsprop_rule(centered=True),
        4,
    ),
    "Adafactor": (lambda p: torch.optim.Adafactor(p, lr=1e-2), 0.0, adafactor_rule(), 4),
}


@pytest.mark.parametrize("name", list(PRECONDITIONERS))
def test_preconditioner_audit_matches_the_documented_update_rule(name):
    factory, l2, rule, steps = PRECONDITIONERS[name]
    model = tiny_model()
    optimizer = factory(model.parameters())
    fed = feed(model, optimizer, [make_batch(6, seed) for seed in range(steps)], l2)
    d = dense(model, *make_batch(10, 99))
    audit = preconditioner_audit(
        optimizer, dict(model.named_parameters()), hand_measurement(model, d)
    )

    assert isinstance(audit, PreconditionerAudit)
    assert audit.name == type(optimizer).__name__ and audit.notes == []
    expected = {
        layer: torch.cat([rule([step[n] for step in fed]).reshape(-1) for n in names])
        for layer, names in LAYERS.items()
    }
    everything = torch.cat(list(expected.values()))
    fisher_root, empirical_root = torch.diagonal(d.F).sqrt(), torch.diagonal(d.EF).sqrt()
    scopes = {**d.slices, "all": slice(0, d.g.numel())}
    assert set(audit.scalars) == {
        f"optimizer/preconditioner_{which}_cosine/{scope}"
        for which in ("fisher", "ef")
        for scope in scopes
    }
    for scope, s in scopes.items():
        assert audit.scalars[f"optimizer/preconditioner_fisher_cosine/{scope}"] == pytest.approx(
            cosine(everything[s], fisher_root[s]), abs=TOLERANCE
        )
        assert audit.scalars[f"optimizer/preconditioner_ef_cosine/{scope}"] == pytest.approx(
            cosine(everything[s], empirical_root[s]), abs=TOLERANCE
        )
    for layer, s in d.slices.items():
        torch.testing.assert_close(audit.denominators[layer], expected[layer], rtol=1e-10, atol=0)
        ratio = torch.log10(expected[layer] / fisher_root[s])
        torch.testing.assert_close(
            audit.log_ratios[layer], ratio[torch.isfinite(ratio)].float(), rtol=1e-6, atol=1e-6
        )


def test_log_ratios_drop_zero_fisher_entries():
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters())
    feed(model, optimizer, [make_batch(6, 0)])
    d = dense(model, *make_batch(10, 1))
    measurement = hand_measurement(model, d)
    fisher, empirical = measurement.diagonals["2"]
    fisher[:3] = 0.0
    audit = preconditioner_audit(optimizer, dict(model.named_parameters()), measurement)
    assert audit.log_ratios["2"].numel() == fisher.numel() - 3
    assert torch.isfinite(audit.log_ratios["2"]).all()


def test_adagrad_fed_per_sample_gradients_is_the_ef_diagonal_exactly():
    """Σ_n g_n² = N diag EF, so Adagrad (s_0 = 0, ε = 0) fed g_1 … g_N has d = √(N diag EF)."""
    model = tiny_model()
    x, y = make_batch(8, 0)
    d = dense(model, x, y)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.0, eps=0.0)
    set_gradients = gradient_setter(model)
    for row in d.per_sample:
        set_gradients(row)
        optimizer.step()
    audit = preconditioner_audit(
        optimizer, dict(model.named_parameters()), hand_measurement(model, d)
    )
    for scope in ("0", "2", "all"):
        assert audit.scalars[f"optimizer/preconditioner_ef_cosine/{scope}"] == pytest.approx(
            1.0, abs=1e-12
        )
    for layer, s in d.slices.items():
        torch.testing.assert_close(
            audit.denominators[layer], (8 * torch.diagonal(d.EF)[s]).sqrt(), rtol=1e-12, atol=0
        )


def gradient_setter(model: nn.Module):
    parameters = list(model.parameters())
    sizes = [p.numel() for p in parameters]

    def set_gradients(vector: Tensor) -> None:
        for parameter, piece in zip(parameters, torch.split(vector, sizes), strict=True):
            parameter.grad = piece.reshape(parameter.shape).clone()

    return set_gradients


def minibatch_moments(per_sample: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """Exact mean and standard deviation of g_B² over all N^B ordered draws."""
    draws = torch.tensor(list(itertools.product(range(per_sample.shape[0]), repeat=batch_size)))
    squares = per_sample[draws].mean(dim=1) ** 2
    return squares.mean(dim=0), squares.std(dim=0, correction=0)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_adam_second_moment_tracks_the_minibatch_second_moment(batch_size):
    """Statistical: with θ fixed (lr = 0), v̂ is a weighted mean of T draws of g_B² with
    weights w_k = (1−β₂)β₂^{T−k}/(1−β₂ᵀ) summing to 1, so E[v̂] = E[g_B²] = g² +
    (diag EF − g²)/B, and its standard deviation is (Σ w_k²)^½ · sd(g_B²) per coordinate.
    Tolerance: 6 standard deviations per coordinate (a seeded run, deterministic)."""
    model = tiny_model()
    x, y = make_batch(8, 0)
    d = dense(model, x, y)
    beta2, steps = 1 - 1e-4, 3000
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0, betas=(0.0, beta2), eps=1e-12)
    set_gradients = gradient_setter(model)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(0, 8, (batch_size,), generator=generator)
        set_gradients(d.per_sample[rows].mean(dim=0))
        optimizer.step()

    exact_mean, spread = minibatch_moments(d.per_sample, batch_size)
    formula = minibatch_second_moment(torch.diagonal(d.EF), d.g, batch_size)
    torch.testing.assert_close(formula, exact_mean, rtol=1e-12, atol=1e-15)

    weights = torch.tensor([(1 - beta2) * beta2 ** (steps - k) for k in range(1, steps + 1)])
    weights = weights / (1 - beta2**steps)
    standard_error = weights.square().sum().sqrt() * spread
    v_hat = torch.cat(
        [
            optimizer.state[p]["exp_avg_sq"].reshape(-1) / (1 - beta2**steps)
            for p in model.parameters()
        ]
    )
    assert ((v_hat - formula).abs() <= 6 * standard_error + 1e-15).all()

    audit = preconditioner_audit(
        optimizer, dict(model.named_parameters()), hand_measurement(model, d)
    )
    target = torch.cat(list(audit.denominators.values()))
    assert cosine(target, formula.sqrt()) > 0.999
    if batch_size == 1:  # E[g_B²] = diag EF: the EF cosine → 1
        assert audit.scalars["optimizer/preconditioner_ef_cosine/all"] > 0.999


@pytest.mark.parametrize("n,batch_size", [(5, 1), (5, 3), (6, 4)])
def test_minibatch_second_moment_by_enumeration(n, batch_size):
    per_sample = torch.randn(n, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    diag_ef, g = per_sample.square().mean(dim=0), per_sample.mean(dim=0)
    with_replacement, _ = minibatch_moments(per_sample, batch_size)
    torch.testing.assert_close(
        minibatch_second_moment(diag_ef, g, batch_size), with_replacement, rtol=1e-12, atol=0
    )
    subsets = torch.tensor(list(itertools.combinations(range(n), batch_size)))
    without = (per_sample[subsets].mean(dim=1) ** 2).mean(dim=0)
    torch.testing.assert_close(
        minibatch_second_moment(diag_ef, g, batch_size, population=n), without, rtol=1e-12, atol=0
    )


def test_minibatch_second_moment_rejects_bad_sizes():
    ones = torch.ones(3)
    with pytest.raises(ValueError, match=r"Invalid batch_size: 0\."):
        minibatch_second_moment(ones, ones, 0)
    with pytest.raises(ValueError, match=r"Invalid population: 3\."):
        minibatch_second_moment(ones, ones, 4, population=3)


@pytest.mark.parametrize(
    "factory",
    [
        lambda p: torch.optim.SGD(p, lr=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
        lambda p: torch.optim.Rprop(p),
    ],
    ids=["SGD", "SGD momentum", "Rprop"],
)
def test_optimizers_without_a_second_moment_give_none(factory):
    model = tiny_model()
    optimizer = factory(model.parameters())
    measurement = hand_measurement(model, dense(model, *make_batch(6, 0)))
    assert preconditioner_audit(optimizer, dict(model.named_parameters()), measurement) is None
    feed(model, optimizer, [make_batch(6, 1)])
    assert preconditioner_audit(optimizer, dict(model.named_parameters()), measurement) is None


@pytest.mark.parametrize("name", ["Adam", "Adagrad", "RAdam", "Adafactor"])
def test_before_the_first_step_there_is_nothing_to_audit(name):
    model = tiny_model()
    optimizer = getattr(torch.optim, name)(model.parameters())
    measurement = hand_measurement(model, dense(model, *make_batch(6, 0)))
    audit = preconditioner_audit(optimizer, dict(model.named_parameters()), measurement)
    assert audit is not None and audit.name == name
    assert audit.scalars == {} and audit.log_ratios == {}
    assert "no state yet" in audit.note and "before its first step" in audit.note


def test_parameters_outside_the_optimizer_are_left_out_with_a_note():
    model = tiny_model()
    optimizer = torch.optim.Adam(model[2].parameters(), lr=1e-2)
    feed(model, optimizer, [make_batch(6, 0)])
    d = dense(model, *make_batch(10, 1))
    audit = preconditioner_audit(
        optimizer, dict(model.named_parameters()), hand_measurement(model, d)
    )
    assert set(audit.scalars) == {
        f"optimizer/preconditioner_{w}_cosine/{s}" for w in ("fisher", "ef") for s in ("2", "all")
    }
    for which in ("fisher", "ef"):
        assert audit.scalars[f"optimizer/preconditioner_{which}_cosine/all"] == pytest.approx(
            audit.scalars[f"optimizer/preconditioner_{which}_cosine/2"], abs=1e-15
        )
    assert "not in Adam's param groups" in audit.note and "['0.weight', '0.bias']" in audit.note


def test_parameters_without_gradient_yet_are_left_out_of_a_layer():
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model[2].bias.requires_grad_(False)
    feed(model, optimizer, [make_batch(6, 0)])
    model[2].bias.requires_grad_(True)
    d = dense(model, *make_batch(10, 1))
    audit = preconditioner_audit(
        optimizer, dict(model.named_parameters()), hand_measurement(model, d)
    )
    assert audit.denominators["2"].numel() == 12  # the weight only
    s = d.slices["2"]
    weight = torch.diagonal(d.F)[s][:12].sqrt()
    assert audit.scalars["optimizer/preconditioner_fisher_cosine/2"] == pytest.approx(
        cosine(audit.denominators["2"], weight), abs=TOLERANCE
    )
    assert "['2.bias']" in audit.note


def test_radam_steps_without_second_moment_are_noted():
    model = tiny_model()
    optimizer = torch.optim.RAdam(model.parameters(), lr=1e-2)
    feed(model, optimizer, [make_batch(6, seed) for seed in range(2)])
    measurement = hand_measurement(model, dense(model, *make_batch(6, 9)))
    audit = preconditioner_audit(optimizer, dict(model.named_parameters()), measurement)
    assert audit.scalars and "RAdam step 2 used no second moment" in audit.note


def test_lightning_optimizer_is_unwrapped_and_missing_parameters_are_named():
    from pytorch_lightning.core.optimizer import LightningOptimizer

    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    feed(model, optimizer, [make_batch(6, 0)])
    measurement = hand_measurement(model, dense(model, *make_batch(6, 1)))
    parameters = dict(model.named_parameters())
    audit = preconditioner_audit(LightningOptimizer(optimizer), parameters, measurement)
    assert audit.name == "AdamW"
    assert audit.scalars == preconditioner_audit(optimizer, parameters, measurement).scalars
    del parameters["0.bias"]
    with pytest.raises(ValueError, match=r"no entry for the measured parameters \['0.bias'\]"):
        preconditioner_audit(optimizer, parameters, measurement)


# --- with the engine's measurement ---------------------------------------------------------


def test_has_second_moment():
    from fisher_monitor.audit import has_second_moment

    model = tiny_model()
    assert has_second_moment(torch.optim.AdamW(model.parameters()))
    assert has_second_moment(torch.optim.Adagrad(model.parameters()))
    assert not has_second_moment(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
