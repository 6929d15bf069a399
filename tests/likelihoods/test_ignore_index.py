"""``ignore_index``: ignored positions drop out of ``ℓ_n`` on the loss side (residual, square
root, coefficients, sampled and sketched columns), so that F and EF come from the same
``ℓ_n``; a sample whose every position is ignored contributes nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import grad, hessian, vmap

import reference
from fisher_monitor import measure
from fisher_monitor.likelihoods import (
    Categorical,
    SketchedLikelihood,
    UnsupportedLossError,
    loss_side,
    rademacher,
    resolve_loss,
)
from reference_checks import assert_matches
from sequence_models import sequence_model


def _case(shape, ignore: int, generator):
    outputs = 3 * torch.randn(*shape, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=generator)
    targets.view(-1)[1::3] = ignore
    targets[0] = ignore  # a sample with every position ignored
    return outputs, targets


@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 3), (5, 3, 2, 2)])
@pytest.mark.parametrize("ignore", [-100, 0])  # 0: a valid class index, ignored all the same
def test_loss_side_is_the_derivatives_of_the_kept_positions(shape, ignore):
    likelihood = resolve_loss(nn.CrossEntropyLoss(ignore_index=ignore))
    assert likelihood == Categorical("mean", ignore)
    outputs, targets = _case(shape, ignore, torch.Generator().manual_seed(0))
    likelihood.check_batch(outputs, targets)
    nll = reference.sample_nll(nn.CrossEntropyLoss(ignore_index=ignore))
    n = outputs.shape[0]

    def sample(f, y):
        return nll(f.reshape(1, *shape[1:]), y.unsqueeze(0))

    flat = outputs.reshape(n, -1)
    gradient, hess = vmap(grad(sample))(flat, targets), vmap(hessian(sample))(flat, targets)
    side = loss_side(likelihood, outputs, targets, exact=True)
    roots, beta = side.columns, side.coefficients
    torch.testing.assert_close(roots @ roots.transpose(1, 2), hess, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(likelihood.residuals(outputs, targets), gradient)
    torch.testing.assert_close((roots @ beta.unsqueeze(-1)).squeeze(-1), gradient)
    assert not roots[0].any() and not beta[0].any() and not gradient[0].any()


@pytest.mark.parametrize("sketched", [False, True])
def test_sampled_and_sketched_columns_leave_ignored_positions_out(sketched):
    likelihood = Categorical("mean", 2)
    outputs, targets = _case((4, 5, 3), 2, torch.Generator().manual_seed(1))
    if sketched:
        likelihood = SketchedLikelihood(likelihood)
    torch.manual_seed(0)
    noise = likelihood.draw_noise(outputs, 6)
    side = loss_side(likelihood, outputs, targets, exact=False, noise=noise)
    ignored = (targets == 2).unsqueeze(1).expand(-1, 5, -1).reshape(4, -1)  # (N, K)
    assert not side.columns[ignored].any()  # every column, the observed residual too
    assert side.columns[~ignored].abs().sum() > 0
    if sketched:  # the sketch's rows at the kept positions are the unmasked sketch's
        columns = likelihood.base.sketch_columns(outputs, noise)
        torch.testing.assert_close(side.columns[..., :-1][~ignored], columns[~ignored])


def test_measure_against_the_reference_with_ignored_positions():
    torch.manual_seed(0)
    model = sequence_model().double()
    inputs = torch.randn(7, 5, 3, dtype=torch.float64)
    targets = torch.randint(0, 4, (7, 5))
    targets.view(-1)[::4] = -100
    targets[3] = -100
    loss = nn.CrossEntropyLoss()
    expected = reference.diag_and_block_metrics(model, loss, inputs, targets)
    for backend in ("backpack", "functorch"):
        result = measure(model, loss, inputs, targets, backend=backend)
        assert_matches(result.scalars, expected)
    kron = measure(model, loss, inputs, targets, structures=("kron",), backend="backpack")
    assert all(value == value for value in kron.scalars.values())  # measured, no NaN


def test_a_sample_with_every_position_ignored_adds_nothing():
    """The sums N·F, N·EF and N·g with the sample equal those without it."""
    torch.manual_seed(0)
    model = sequence_model().double()
    inputs = torch.randn(6, 5, 3, dtype=torch.float64)
    targets = torch.randint(0, 4, (6, 5))
    targets[2] = -100
    with_it = measure(model, nn.CrossEntropyLoss(), inputs, targets, keep_blocks=True)
    keep = torch.tensor([0, 1, 3, 4, 5])
    without = measure(model, nn.CrossEntropyLoss(), inputs[keep], targets[keep], keep_blocks=True)
    for layer, blocks in with_it.blocks.items():
        for ours, theirs in zip(blocks, without.blocks[layer], strict=True):
            torch.testing.assert_close(6 * ours, 5 * theirs, rtol=1e-12, atol=1e-14)


def test_options_that_are_no_likelihood_are_refused_with_why_and_what_to_do():
    with pytest.raises(UnsupportedLossError, match=r"label_smoothing=0\.1.*not a negative"):
        resolve_loss(nn.CrossEntropyLoss(label_smoothing=0.1))
    with pytest.raises(UnsupportedLossError, match=r"penalty.*loss_fn=nn\.CrossEntropyLoss\(\)"):
        resolve_loss(nn.CrossEntropyLoss(label_smoothing=0.1))
    with pytest.raises(UnsupportedLossError, match="class `weight`"):
        resolve_loss(nn.CrossEntropyLoss(weight=torch.ones(3), ignore_index=0))
    with pytest.raises(UnsupportedLossError, match="reduction='none'"):
        resolve_loss(nn.CrossEntropyLoss(reduction="none", ignore_index=0))
    rebuilt = Categorical("sum", 7).make_module()
    assert isinstance(rebuilt, nn.CrossEntropyLoss)
    assert (rebuilt.reduction, rebuilt.ignore_index) == ("sum", 7)
    assert repr(Categorical("sum", 7)) == "Categorical(reduction='sum', ignore_index=7)"
    assert Categorical("sum", 7) != Categorical("sum", -100)


def test_targets_outside_the_classes_name_ignore_index():
    outputs, targets = torch.zeros(3, 4), torch.tensor([0, 5, -100])
    with pytest.raises(ValueError, match=r"in \[0, 4\) or ignore_index \(-100\), found 5"):
        Categorical().check_batch(outputs, targets)
    Categorical().check_batch(outputs, torch.tensor([0, 3, -100]))  # -100 is fine


def test_rademacher_is_unchanged_by_masking():
    """Masking happens after the draw: the same signs are used (reproducible sketches)."""
    torch.manual_seed(3)
    first = rademacher((2, 3, 4))
    torch.manual_seed(3)
    likelihood = SketchedLikelihood(Categorical("mean", 1))
    outputs = torch.zeros(2, 4, dtype=torch.float64)
    assert torch.equal(likelihood.draw_noise(outputs, 3), first)
