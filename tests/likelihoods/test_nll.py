"""``NLLLoss`` on log-probabilities (``CategoricalLogProbs``): its loss side from the
definitions, and the same F, EF and metrics as ``CrossEntropyLoss`` on the logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import grad, vmap

import reference
from fisher_monitor import measure
from fisher_monitor.likelihoods import (
    LIKELIHOODS,
    CategoricalLogProbs,
    loss_side,
    resolve_loss,
)
from reference_checks import assert_matches
from sequence_models import sequence_model


def _log_probs(shape, generator, ignore=None):
    logits = 3 * torch.randn(*shape, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=generator)
    if ignore is not None:
        targets[0, ...] = ignore  # one sample entirely ignored
        targets.view(-1)[1::5] = ignore
    return logits.log_softmax(dim=1), targets


def _enumerated_fisher(log_probs: torch.Tensor) -> torch.Tensor:
    """``E_{ŷ~p}[∇ℓ ∇ℓᵀ]`` per sample by summing over every class at every position, with
    ``∇ℓ(ŷ)`` from autograd on ``−z_ŷ`` (labels drawn independently per position: the
    cross terms vanish because each position's score has mean zero)."""
    n, classes = log_probs.shape[:2]
    flat = log_probs.reshape(n, classes, -1)
    positions = flat.shape[2]
    fisher = torch.zeros(n, classes * positions, classes * positions, dtype=torch.float64)
    for t in range(positions):
        for c in range(classes):

            def nll(z, t=t, c=c):
                return -z.reshape(classes, positions)[c, t]

            scores = vmap(grad(nll))(flat.reshape(n, -1))  # (N, K)
            weight = flat[:, c, t].exp()
            fisher += weight[:, None, None] * scores[:, :, None] * scores[:, None, :]
    return fisher


@pytest.mark.parametrize("shape", [(6, 4), (5, 3, 4), (4, 3, 2, 2)])
@pytest.mark.parametrize("ignore", [None, 2])
def test_loss_side_from_the_definitions(shape, ignore):
    likelihood = CategoricalLogProbs("mean", -100 if ignore is None else ignore)
    outputs, targets = _log_probs(shape, torch.Generator().manual_seed(0), ignore)
    likelihood.check_batch(outputs, targets)
    loss = reference.sample_nll(likelihood.module_class(ignore_index=likelihood.ignore_index))
    n = outputs.shape[0]

    def sample(z, y):
        return loss(z.reshape(1, *outputs.shape[1:]), y.unsqueeze(0))

    gradient = vmap(grad(sample))(outputs.reshape(n, -1), targets)
    kept = likelihood.output_mask(targets, outputs.shape[1:])
    fisher = _enumerated_fisher(outputs) * kept[:, :, None] * kept[:, None, :]
    side = loss_side(likelihood, outputs, targets, exact=True)
    roots = side.columns
    torch.testing.assert_close(roots @ roots.transpose(1, 2), fisher, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(likelihood.residuals(outputs, targets), gradient)
    rebuilt = (roots @ side.coefficients.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(rebuilt, gradient, rtol=1e-10, atol=1e-13)
    if ignore is not None:  # the sample whose every position is ignored: nothing at all
        assert not roots[0].any() and not side.coefficients[0].any() and not gradient[0].any()


def test_sketch_and_sampled_columns():
    likelihood = CategoricalLogProbs()
    outputs, targets = _log_probs((3, 4, 2), torch.Generator().manual_seed(1))
    signs = torch.randint(0, 2, likelihood.sketch_sign_shape(outputs, 5)).double() * 2 - 1
    roots = likelihood.sqrt_hessian(outputs)  # diag(√p)
    expected = torch.einsum("nkr,njr->nkj", roots, signs.reshape(3, 5, -1)) / 5**0.5
    torch.testing.assert_close(likelihood.sketch_columns(outputs, signs), expected)
    torch.manual_seed(0)
    noise = likelihood.draw_noise(outputs, 4)
    sampled = likelihood.sampled_residuals(outputs, noise) * 2  # one draw per column
    # each column is −e_ŷ at every position: one −1 per position, zeros elsewhere
    per_position = sampled.reshape(3, 4, 2, 4)
    assert torch.equal(per_position.sum(dim=1), -torch.ones(3, 2, 4, dtype=torch.float64))
    assert set(per_position.unique().tolist()) == {-1.0, 0.0}


@pytest.mark.montecarlo
def test_sampled_labels_follow_the_model():
    """The frequency of each drawn class is p within 6 standard errors (40000 draws)."""
    likelihood = CategoricalLogProbs()
    outputs, _ = _log_probs((2, 5), torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    draws = 40_000
    sampled = likelihood.sampled_residuals(outputs, likelihood.draw_noise(outputs, draws))
    frequency = -(sampled * draws**0.5).mean(dim=2)
    probs = outputs.exp()
    assert ((frequency - probs).abs() <= 6 * (probs * (1 - probs) / draws).sqrt() + 1e-12).all()


def test_raw_logits_are_refused_with_the_fix():
    likelihood = CategoricalLogProbs()
    logits = torch.randn(4, 3) + 2.0
    with pytest.raises(ValueError, match=r"log-probabilities.*loss_fn=nn.CrossEntropyLoss\(\)"):
        likelihood.check_batch(logits, torch.zeros(4, dtype=torch.long))
    net = nn.Linear(2, 3).double()
    with pytest.raises(ValueError, match="not log-probabilities"):
        measure(net, nn.NLLLoss(), torch.randn(4, 2, dtype=torch.float64), torch.zeros(4).long())


def test_registered_and_resolved():
    assert LIKELIHOODS["nll"] is CategoricalLogProbs
    assert resolve_loss("nll") == CategoricalLogProbs("mean")
    assert resolve_loss(nn.NLLLoss(reduction="sum", ignore_index=3)) == CategoricalLogProbs(
        "sum", 3
    )
    with pytest.raises(ValueError, match="class `weight`"):
        resolve_loss(nn.NLLLoss(weight=torch.ones(3)))
    # the backends evaluate the probe loss with a cross-entropy, equal on log-probabilities
    outputs, targets = _log_probs((5, 4, 3), torch.Generator().manual_seed(4), ignore=1)
    likelihood = CategoricalLogProbs("mean", 1)
    torch.testing.assert_close(
        likelihood.make_module()(outputs, targets),
        nn.NLLLoss(ignore_index=1)(outputs, targets),
    )


def _networks(positions: bool):
    torch.manual_seed(0)
    if positions:
        logits = sequence_model().double()
    else:
        logits = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    return logits, nn.Sequential(logits, nn.LogSoftmax(dim=1))


def _batch(positions: bool, ignore: int | None = None):
    generator = torch.Generator().manual_seed(1)
    shape = (8, 5, 3) if positions else (8, 3)
    inputs = torch.randn(*shape, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 4, shape[:-1], generator=generator)
    if ignore is not None:
        targets.view(-1)[::3] = ignore
    return inputs, targets


def _comparable(scalars: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Scalars keyed by layer names without the LogSoftmax wrapper's ``0.`` prefix."""
    out = {}
    for key, value in scalars.items():
        if key == "probe/seconds":
            continue
        structure, _, rest = key.partition("/")
        metric, _, layer = rest.rpartition("/")
        layer = layer[len(prefix) :] if prefix and layer.startswith(prefix) else layer
        out[f"{structure}/{metric}/{layer}"] = value
    return out


@pytest.mark.parametrize("positions", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fisher", ["exact", "mc"])
@pytest.mark.parametrize("backend", ["backpack", "functorch"])
def test_nll_on_log_softmax_equals_cross_entropy_on_logits(positions, reduction, fisher, backend):
    logits, log_probs = _networks(positions)
    inputs, targets = _batch(positions, ignore=2)
    options = dict(
        structures=("diag", "block", "kron") if backend == "backpack" else ("diag", "block"),
        fisher=fisher,
        mc_samples=3,
        backend=backend,
    )
    ce = measure(
        logits,
        nn.CrossEntropyLoss(reduction=reduction, ignore_index=2),
        inputs,
        targets,
        generator=torch.Generator().manual_seed(5),
        **options,
    )
    nll = measure(
        log_probs,
        nn.NLLLoss(reduction=reduction, ignore_index=2),
        inputs,
        targets,
        generator=torch.Generator().manual_seed(5),
        **options,
    )
    assert_matches(_comparable(nll.scalars, "0."), _comparable(ce.scalars), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("positions", [False, True])
def test_nll_against_the_reference(positions):
    """F by enumerating the labels (the definition), EF from autograd per sample."""
    _, log_probs = _networks(positions)
    inputs, targets = _batch(positions, ignore=1)
    loss = nn.NLLLoss(ignore_index=1)
    per_sample = reference.per_sample_gradients(log_probs, loss, inputs, targets)
    jacobians = reference.output_jacobians(log_probs, inputs)  # (N, K, D)
    with torch.no_grad():
        outputs = log_probs(inputs)
    likelihood = CategoricalLogProbs("mean", 1)
    kept = likelihood.output_mask(targets, outputs.shape[1:])
    per_output = _enumerated_fisher(outputs) * kept[:, :, None] * kept[:, None, :]
    fisher = torch.einsum("nkd,nkl,nle->de", jacobians, per_output, jacobians) / len(inputs)
    slices = reference.layer_slices(log_probs)
    expected = {}
    for structure in ("diag", "block"):
        expected.update(
            reference.reference_metrics(fisher, per_sample, slices, structure, [1e-3], "relative")
        )
    result = measure(log_probs, loss, inputs, targets, structures=("diag", "block"))
    assert_matches(result.scalars, expected)
