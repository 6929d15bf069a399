"""The recorder and the recipe without Lightning: what a step records, what is derived, and
that the recipe derived on one batch rebuilds the loss of later batches of other sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import discovery_models as models
from fisher_monitor.callback.derivation import NoLossSeen, derive
from fisher_monitor.callback.recipe import RecipeError, labelled_only, rows
from fisher_monitor.callback.recording import StepRecorder, buffers_at_start
from fisher_monitor.likelihoods import Bernoulli, Categorical, CategoricalLogProbs, Gaussian


def record(network: nn.Module, step, batch):
    """Run ``step(network, batch)`` under the recorder; the recording."""
    recorder = StepRecorder()
    recorder.start({"": network}, batch, 0, owner=network)
    try:
        step(network, batch)
    finally:
        recording = recorder.stop()
    assert torch._C._len_torch_function_stack() == 0
    assert not network._forward_hooks and not network._forward_pre_hooks
    return recording


def check_rebuilds(network, step, first, later):
    """Derive on ``first``; on ``later`` the recipe's probe gives the recorded loss's input
    and targets (rows for class labels) from the network's output."""
    recipe, likelihood = derive(record(network, step, first), network)
    recording = record(network, step, later)
    (loss,) = [call for call in recording.losses if call.training]
    inputs, targets = recipe.split(later)
    with torch.no_grad():
        raw = recipe.network(*inputs.args, **inputs.kwargs)
    outputs = recipe.output(raw)
    likelihood.check_batch(outputs, targets)
    if isinstance(likelihood, (Categorical, CategoricalLogProbs)):
        source = loss.input.log_softmax(1) if recipe.reading else loss.input
        candidate = outputs.log_softmax(1) if recipe.reading else outputs
        torch.testing.assert_close(rows(candidate), rows(source.detach()))
        assert torch.equal(targets.reshape(-1), loss.target.reshape(-1))
    else:
        torch.testing.assert_close(outputs.reshape(-1), loss.input.detach().reshape(-1))
        assert torch.equal(targets.reshape(-1), loss.target.reshape(-1).to(targets.dtype))
    return recipe, likelihood


def tokens(n: int, length: int, labels: bool = False):
    dataset = models.Tokens(n=n, length=length, labels=labels)
    return {key: torch.stack([dataset[i][key] for i in range(n)]) for key in dataset[0]}


def lm_shift(model, batch):
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    return F.cross_entropy(
        logits[..., :-1, :].contiguous().view(-1, logits.shape[-1]),
        batch["input_ids"][..., 1:].contiguous().view(-1),
    )


def hf_style(model, batch):
    """transformers' ForCausalLMLoss, with ignore_index 0."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).float()
    labels = F.pad(batch["input_ids"], (0, 1), value=0)
    shift = labels[..., 1:].contiguous()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), shift.view(-1), ignore_index=0)


def first_token(model, batch):
    logits = model(batch["input_ids"])
    return F.cross_entropy(logits[:, 0], batch["input_ids"][:, -1])


def per_position_transposed(model, batch):
    logits = model(batch["input_ids"])
    return F.nll_loss(logits.log_softmax(-1).transpose(1, 2), batch["input_ids"], reduction="sum")


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (lm_shift, Categorical("mean")),
        (hf_style, Categorical("mean", 0)),
        (first_token, Categorical("mean")),
        (per_position_transposed, Categorical("sum")),
    ],
)
def test_language_model_recipes_generalise_to_other_batch_sizes_and_lengths(step, expected):
    torch.manual_seed(0)
    model = models.TinyGPT(length=8)
    _, likelihood = check_rebuilds(
        model, step, tokens(4, 6, labels=True), tokens(3, 8, labels=True)
    )
    assert likelihood == expected


class Images(nn.Module):
    def __init__(self, out: int = 3, log_probs: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, out))
        self.log_probs = log_probs

    def forward(self, x):
        out = self.net(x)
        return out.log_softmax(dim=1) if self.log_probs else out


def images(n: int):
    generator = torch.Generator().manual_seed(n)
    x = torch.randint(0, 255, (n, 1, 4, 4), generator=generator, dtype=torch.uint8)
    return {"image": x, "label": torch.randint(0, 3, (n,), generator=generator)}


@pytest.mark.parametrize(
    ("step", "out", "log_probs", "expected"),
    [
        (
            lambda m, b: F.cross_entropy(m(b["image"].float()), b["label"]),
            3,
            False,
            Categorical(),
        ),
        (
            lambda m, b: F.nll_loss(m(b["image"].float()), b["label"]),
            3,
            True,
            CategoricalLogProbs(),
        ),
        (
            lambda m, b: F.mse_loss(m(b["image"].flatten(1).float()), b["label"].float()[:, None]),
            1,
            False,
            Gaussian(),
        ),
        (
            lambda m, b: F.binary_cross_entropy_with_logits(
                m(b["image"].float()).squeeze(), (b["label"] % 2).float()
            ),
            1,
            False,
            None,  # the targets are computed from the labels: refused
        ),
        (
            lambda m, b: F.binary_cross_entropy_with_logits(
                m(b["image"].float()).squeeze(), b["label"].float()
            ),
            1,
            False,
            Bernoulli(),
        ),
    ],
)
def test_classifier_recipes(step, out, log_probs, expected):
    torch.manual_seed(0)
    network = Images(out, log_probs)
    if expected is None:
        with pytest.raises(RecipeError, match="none of the batch's entries"):
            derive(record(network, step, images(4)), network)
        return
    if expected == Bernoulli():  # 0/1 labels for a Bernoulli
        batch, later = images(4), images(5)
        for b in (batch, later):
            b["label"] = b["label"] % 2
    else:
        batch, later = images(4), images(5)
    _, likelihood = check_rebuilds(network, step, batch, later)
    assert likelihood == expected


def test_an_argument_computed_from_the_batch_is_replayed_as_recorded():
    """``x.float() / 255`` is not an entry of the batch: it must be refused, not guessed."""
    torch.manual_seed(0)
    network = Images()
    recipe, _ = derive(
        record(network, lambda m, b: F.cross_entropy(m(b["image"].float()), b["label"]), images(4)),
        network,
    )
    assert recipe.args[0].text() == "batch['image'].to(torch.float32)"
    scaled = record(
        network, lambda m, b: F.cross_entropy(m(b["image"].float() / 255), b["label"]), images(4)
    )
    with pytest.raises(RecipeError, match="argument #0 .* cannot replay"):
        derive(scaled, network)


def test_no_loss_call_and_unreduced_losses():
    network = Images()
    with pytest.raises(NoLossSeen):
        derive(record(network, lambda m, b: m(b["image"].float()).sum(), images(4)), network)
    summed = record(
        network,
        lambda m, b: F.cross_entropy(m(b["image"].float()), b["label"], reduction="none").sum(),
        images(4),
    )
    assert derive(summed, network)[1] == Categorical("sum")
    weighted = record(
        network,
        lambda m, b: F.cross_entropy(m(b["image"].float()), b["label"], reduction="none")[:2].sum(),
        images(4),
    )
    with pytest.raises(RecipeError, match=r"followed by __getitem__\(…\)"):
        derive(weighted, network)


def test_buffers_as_at_the_step_start_without_writing_to_them():
    network = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    batch = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    before = network[1].running_mean.clone()
    recorder = StepRecorder()
    recorder.start({"": network}, batch, 0, owner=network)
    F.cross_entropy(network(batch[0]), batch[1])
    recording = recorder.stop()
    updated = network[1].running_mean
    assert not torch.equal(updated, before)
    with buffers_at_start(recording):
        assert torch.equal(network[1].running_mean, before)
    assert network[1].running_mean is updated  # the same tensor object, never written


def test_samples_without_a_label_leave_the_probe():
    inputs = {"ids": torch.arange(12).reshape(4, 3), "shared": torch.ones(1, 3)}
    targets = torch.tensor([[1, 2, 0], [-100, -100, -100], [0, -100, 1], [-100, -100, -100]])
    kept_inputs, kept_targets = labelled_only(inputs, targets, Categorical())
    assert torch.equal(kept_targets, targets[[0, 2]])
    assert torch.equal(kept_inputs["ids"], inputs["ids"][[0, 2]])
    assert kept_inputs["shared"] is inputs["shared"]
    same = labelled_only(inputs, targets[[0, 2]], Gaussian())  # no ignored targets: as is
    assert same[0] is inputs
    empty = labelled_only(inputs, targets[:0], Categorical())  # the engine names it
    assert empty[0] is inputs and empty[1].shape == (0, 3)
