"""Losses and batches as users write them, found by ``FisherMonitor()`` in real fits.

The monitor records the first measured training step and derives the probe from it; every
case checks the first measurement against ``measure()`` told explicitly what to measure
(or against the float64 reference), and that training is untouched.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import discovery_models as models
import reference
from fisher_monitor import FisherMonitor, measure, schedules
from lightning_helpers import SpyLogger, TinyClassifier, dataset, fit, loader
from reference_checks import assert_matches

HEADLINE = (
    "direction_cosine",
    "nat_grad_cosine",
    "kl",
    "nat_projection",
    "rel_error",
    "trace_ratio",
)


def headline_keys(structures=("diag", "block")) -> list[str]:
    return [f"~fisher/{s}/{metric}/all" for s in structures for metric in HEADLINE]


def monitor_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "`FisherMonitor`" in str(w.message)]


def first_values(logger: SpyLogger, step: int = 0) -> dict[str, float]:
    """The measurement's scalars logged at ``step``, without the prefix."""
    values = {}
    for logged_step, metrics in logger.calls:
        if logged_step == step:
            values.update({k[len("~fisher/") :]: v for k, v in metrics.items()})
    return values


def assert_same_measurement(logger: SpyLogger, expected, step: int = 0, rtol=1e-6):
    logged = first_values(logger, step)
    for key in ("block/direction_cosine/all", "block/kl/all", "diag/rel_error/all"):
        assert logged[f"{key}"] == pytest.approx(expected[key], rel=rtol), key
    assert logged["probe/batch_size"] == expected["probe/batch_size"]


# ---------------------------------------------------------------------- functional forms


class Written(TinyClassifier):
    """The tiny classifier with ``training_step`` written as ``step(self, x, y)``."""

    def __init__(self, step, outputs: int = 3, final: nn.Module | None = None):
        super().__init__()
        del self.loss_fn
        self.net[-1] = nn.Linear(8, outputs)
        if final is not None:
            self.net.append(final)
        self.step = step

    def training_step(self, batch, batch_idx):
        return self.step(self, *batch)


FORMS = {
    "F.cross_entropy": (
        lambda m, x, y: F.cross_entropy(m(x), y),
        {},
        lambda x, y: (nn.CrossEntropyLoss(), y),
    ),
    "module in training_step, sum": (
        lambda m, x, y: nn.CrossEntropyLoss(reduction="sum")(m(x), y),
        {},
        lambda x, y: (nn.CrossEntropyLoss(reduction="sum"), y),
    ),
    "F.nll_loss on F.log_softmax": (
        lambda m, x, y: F.nll_loss(F.log_softmax(m(x), dim=-1), y),
        {},
        lambda x, y: (nn.CrossEntropyLoss(), y),
    ),
    "LogSoftmax network with F.nll_loss": (
        lambda m, x, y: F.nll_loss(m(x), y),
        {"final": nn.LogSoftmax(dim=1)},
        lambda x, y: (nn.NLLLoss(), y),
    ),
    "reduction none, then mean": (
        lambda m, x, y: F.cross_entropy(m(x), y, reduction="none").mean(),
        {},
        lambda x, y: (nn.CrossEntropyLoss(), y),
    ),
    "F.mse_loss on a squeezed output": (
        lambda m, x, y: F.mse_loss(m(x).squeeze(1), y.float()),
        {"outputs": 1},
        lambda x, y: (nn.MSELoss(), y.float().unsqueeze(1)),
    ),
    "F.binary_cross_entropy_with_logits": (
        lambda m, x, y: F.binary_cross_entropy_with_logits(m(x).view(-1), y.float()),
        {"outputs": 1, "labels": "binary"},
        lambda x, y: (nn.BCEWithLogitsLoss(), y.float().unsqueeze(1)),
    ),
    "F.binary_cross_entropy on sigmoid": (
        lambda m, x, y: F.binary_cross_entropy(torch.sigmoid(m(x)), y.float()[:, None]),
        {"outputs": 1, "labels": "binary"},
        lambda x, y: (nn.BCEWithLogitsLoss(), y.float().unsqueeze(1)),
    ),
    "float labels cast in training_step": (
        lambda m, x, y: F.cross_entropy(m(x), y.long()),
        {"labels": "float"},
        lambda x, y: (nn.CrossEntropyLoss(), y.long()),
    ),
    "one-hot labels converted in training_step": (
        lambda m, x, y: F.cross_entropy(m(x), y.argmax(dim=1)),
        {"labels": "one-hot"},
        lambda x, y: (nn.CrossEntropyLoss(), y.argmax(dim=1)),
    ),
    "one-hot labels as class probabilities": (
        lambda m, x, y: F.cross_entropy(m(x), y),
        {"labels": "one-hot"},
        lambda x, y: (nn.CrossEntropyLoss(), y.argmax(dim=1)),
    ),
}


def _data(labels: str | None):
    inputs, targets = dataset().tensors
    if labels == "binary":
        targets = (targets > 0).long()
    elif labels == "float":
        targets = targets.float()
    elif labels == "one-hot":
        targets = F.one_hot(targets, 3).float()
    return inputs, targets


@pytest.mark.parametrize("form", list(FORMS))
def test_functional_losses_are_found_and_measured_as_told_explicitly(form):
    step, options, explicit = FORMS[form]
    options = dict(options)
    labels = options.pop("labels", None)
    inputs, targets = _data(labels)
    torch.manual_seed(0)
    model = Written(step, **options)
    initial = copy.deepcopy(model)
    monitor = FisherMonitor(every_n_steps=1, raise_on_error=True)
    data = DataLoader(TensorDataset(inputs, targets), batch_size=16)
    _, _, logger = fit(monitor, steps=2, model=model, data=data)
    assert logger.steps_with("~fisher/block/direction_cosine/all") == [0, 1]
    loss, probe_targets = explicit(inputs[:16], targets[:16])
    expected = measure(initial.net, loss, inputs[:16], probe_targets)
    assert_same_measurement(logger, expected)
    assert monitor.last_measurement is not None


def test_nll_on_log_softmax_is_read_as_the_cross_entropy_and_said_so():
    monitor = FisherMonitor(every_n_steps=1)
    step = FORMS["F.nll_loss on F.log_softmax"][0]
    fit(monitor, steps=1, model=lambda: Written(step))
    (note,) = [note for note in monitor._info.notes if note.startswith("loss found")]
    assert "F.nll_loss on log_softmax of the logits: measured as the cross-entropy" in note
    assert monitor._info.settings["loss"] == "CrossEntropyLoss(reduction='mean', ignore_index=-100)"


def test_ignore_index_in_training_step_and_unlabelled_samples_left_out():
    """Class 2 is ignored: those samples have no labelled position and leave the probe."""
    torch.manual_seed(0)
    model = Written(lambda m, x, y: F.cross_entropy(m(x), y, ignore_index=2))
    initial = copy.deepcopy(model)
    _, _, logger = fit(FisherMonitor(every_n_steps=1, raise_on_error=True), steps=1, model=model)
    inputs, targets = next(iter(loader()))
    kept = targets != 2
    expected = measure(
        initial.net, nn.CrossEntropyLoss(ignore_index=2), inputs[kept], targets[kept]
    )
    assert expected["probe/batch_size"] == int(kept.sum()) < 16
    assert_same_measurement(logger, expected)


# ---------------------------------------------------------------------- refused, clearly

REFUSED = {
    "label smoothing": (
        lambda m, x, y: F.cross_entropy(m(x), y, label_smoothing=0.1),
        r"F\.cross_entropy\(…, label_smoothing=0\.1\).*not a negative log-likelihood.*"
        r"loss_fn=nn\.CrossEntropyLoss\(\)",
    ),
    "class weights": (
        lambda m, x, y: F.cross_entropy(m(x), y, weight=torch.tensor([1.0, 2.0, 1.0])),
        r"weight=<tensor>.*class `weight` is not a negative log-likelihood",
    ),
    "masked per-sample losses": (
        lambda m, x, y: (F.cross_entropy(m(x), y, reduction="none") * (x[:, 0] > 0)).sum(),
        r"reduction='none'\) is followed by mul.*ignore_index.*-100",
    ),
    "not a likelihood": (
        lambda m, x, y: F.l1_loss(m(x), F.one_hot(y, 3).float()),
        r"F\.l1_loss\(…\), which is not a negative log-likelihood",
    ),
    "targets computed from the inputs": (
        lambda m, x, y: F.cross_entropy(m(x), (x[:, 0] > 0).long()),
        r"targets of F\.cross_entropy\(…\) \(shape \(16,\)\) are none of the batch's entries.*"
        r"batch_to_inputs_targets=lambda batch: \(inputs, targets\)",
    ),
    "soft targets": (
        lambda m, x, y: F.cross_entropy(m(x), torch.softmax(x[:, :3], dim=1)),
        r"class probabilities \(soft targets\).*not labels",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_losses_that_cannot_be_measured_say_why_and_what_to_pass(case):
    step, message = REFUSED[case]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _, logger = fit(FisherMonitor(every_n_steps=1), steps=3, model=Written(step))
    assert trainer.global_step == 3  # training goes on
    (warning,) = monitor_warnings(caught)
    assert "skipped the measurement at step 0" in warning and "monitor is off" in warning
    assert __import__("re").search(message, warning), warning
    assert not logger.steps_with("~fisher/probe/loss")
    with pytest.raises(ValueError, match=message):
        fit(FisherMonitor(raise_on_error=True), steps=1, model=Written(step))


def test_the_suggested_split_measures_targets_computed_in_training_step():
    step = REFUSED["targets computed from the inputs"][0]
    monitor = FisherMonitor(
        every_n_steps=1,
        batch_to_inputs_targets=lambda batch: (batch[0], (batch[0][:, 0] > 0).long()),
    )
    _, _, logger = fit(monitor, steps=2, model=lambda: Written(step))
    assert logger.steps_with("~fisher/block/direction_cosine/all") == [0, 1]


# ---------------------------------------------------------------------- language models


def _fit_lm(model, data, steps=1, **options):
    monitor = FisherMonitor(schedule=schedules.every(1), raise_on_error=True, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, model, logger = fit(monitor, steps=steps, model=model, data=data)
    assert monitor_warnings(caught) == []
    for key in headline_keys():
        assert logger.steps_with(key) == list(range(steps)), key
    return monitor, logger


def _lm_expected(network, batch, targets, outputs, **options):
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return measure(network, nn.CrossEntropyLoss(**options), inputs, targets, outputs=outputs)


@pytest.mark.slow
def test_causal_lm_with_the_shift_written_in_training_step():
    torch.manual_seed(0)
    model = models.CausalLM()
    initial = copy.deepcopy(model.model)
    monitor, logger = _fit_lm(model, models.tokens(batch_size=4), steps=2)
    (note,) = [note for note in monitor._info.notes if note.startswith("loss found")]
    assert "output[:, :-1] (classes last), targets batch['input_ids'][:, 1:]" in note
    assert "input_ids=batch['input_ids'], attention_mask=batch['attention_mask']" in note
    batch = next(iter(models.tokens(batch_size=4)))
    expected = _lm_expected(
        initial,
        batch,
        batch["input_ids"][:, 1:],
        lambda out: out[:, :-1].transpose(1, 2),
    )
    assert_same_measurement(logger, expected)


@pytest.mark.slow
def test_causal_lm_against_the_float64_reference():
    """The first measurement of a float64 fit equals F and EF from their definitions."""

    class Shifted(nn.Module):  # the loss's input per sample, for the reference
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            return self.lm(ids)[:, :-1].transpose(1, 2)

    torch.manual_seed(0)
    model = models.CausalLM(models.TinyGPT(vocab=7, width=4, length=4))
    initial = Shifted(copy.deepcopy(model.model)).double()
    data = models.tokens(n=4, batch_size=4, vocab=7, length=4)
    data.dataset.mask[:] = 1  # no padding: the reference calls the network without a mask
    monitor = FisherMonitor(every_n_steps=1, structures=("diag", "block"), raise_on_error=True)
    _, _, logger = fit(monitor, steps=1, model=model, data=data, precision="64-true")
    ids = next(iter(data))["input_ids"]
    expected = reference.diag_and_block_metrics(initial, nn.CrossEntropyLoss(), ids, ids[:, 1:])
    logged = first_values(logger)
    renamed = {key.replace("/lm.", "/"): value for key, value in expected.items()}
    assert_matches(logged, {k: v for k, v in renamed.items() if "/dimension/" not in k})


@pytest.mark.slow
def test_labels_with_padding_and_a_sample_without_any_label():
    """``labels`` with -100 at padded positions: those positions drop out, and a sample
    whose every label is -100 drops out of the probe."""

    class Padded(models.CausalLM):
        def training_step(self, batch, batch_idx):
            logits = self.model(batch["input_ids"], batch["attention_mask"])
            vocab = logits.shape[-1]
            labels = batch["labels"][:, 1:].reshape(-1)
            return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels)

    data = models.tokens(batch_size=4, labels=True)
    data.dataset.mask[1] = 0  # sample 1: nothing but padding, every label -100
    torch.manual_seed(0)
    model = Padded()
    initial = copy.deepcopy(model.model)
    _, logger = _fit_lm(model, data, steps=1)
    batch = next(iter(data))
    labels = batch["labels"]
    keep = torch.tensor([i for i in range(len(labels)) if (labels[i, 1:] != -100).any()])
    assert len(keep) == len(labels) - 1
    inputs = {k: v[keep] for k, v in batch.items() if k != "labels"}
    expected = measure(
        initial,
        nn.CrossEntropyLoss(),
        (inputs["input_ids"], inputs["attention_mask"]),
        labels[keep, 1:],
        outputs=lambda out: out[:, :-1].transpose(1, 2),
    )
    assert_same_measurement(logger, expected)


def test_hugging_face_gpt2_with_the_loss_in_training_step():
    torch.manual_seed(0)
    model = models.CausalLM(models.tiny_gpt2())
    initial = copy.deepcopy(model.model)
    _, logger = _fit_lm(model, models.tokens(batch_size=4))
    batch = next(iter(models.tokens(batch_size=4)))
    expected = _lm_expected(
        initial,
        batch,
        batch["input_ids"][:, 1:],
        lambda out: out.logits[:, :-1].transpose(1, 2),
    )
    assert_same_measurement(logger, expected)


@pytest.mark.slow
def test_hugging_face_gpt2_computing_its_own_loss_from_labels():
    """``model(**batch).loss``: the cross-entropy inside transformers, on padded labels
    shifted by one with ignore_index=-100; the probe leaves ``labels=`` out."""
    # (a per-sample loop on torch.func: GPT-2's attention mask is built data-dependently)
    torch.manual_seed(0)
    model = models.HFLabels(models.tiny_gpt2())
    initial = copy.deepcopy(model.model)
    data = models.tokens(batch_size=4, labels=True)
    monitor, logger = _fit_lm(model, data)
    (note,) = [note for note in monitor._info.notes if note.startswith("loss found")]
    assert "in GPT2LMHeadModel.forward (called by training_step)" in note
    assert "without labels= (the labels)" in note
    batch = next(iter(data))
    shifted = F.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    expected = _lm_expected(initial, batch, shifted, lambda out: out.logits.transpose(1, 2))
    assert_same_measurement(logger, expected)


@pytest.mark.parametrize("module", [models.BertClassifier, models.BertLogits])
def test_hugging_face_bert_classifier_on_dict_batches(module):
    """``model(**batch).loss`` (the loss inside transformers) or ``F.cross_entropy`` on
    ``out.logits`` in training_step, with attention masks."""
    torch.manual_seed(0)
    model = module()
    initial = copy.deepcopy(model.model)
    data = DataLoader(models.Sentences(), batch_size=4)
    _, logger = _fit_lm(model, data)
    batch = next(iter(data))
    expected = _lm_expected(initial, batch, batch["labels"], lambda out: out.logits)
    assert_same_measurement(logger, expected)


def test_a_model_returning_an_object_with_logits():
    torch.manual_seed(0)
    model = models.ObjectClassifier()
    initial = copy.deepcopy(model.net)
    monitor = FisherMonitor(every_n_steps=1, raise_on_error=True)
    _, _, logger = fit(monitor, steps=2, model=model)
    for key in headline_keys():
        assert logger.steps_with(key) == [0, 1]
    inputs, targets = next(iter(loader()))
    expected = measure(initial, nn.CrossEntropyLoss(), inputs, targets, outputs=lambda o: o.logits)
    assert_same_measurement(logger, expected)


# ---------------------------------------------------------------------- training untouched


def _no_traces(model: nn.Module) -> None:
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, module
    assert torch._C._len_torch_function_stack() == 0


def test_training_is_bit_identical_and_nothing_is_left_on_the_model():
    def train(monitor):
        torch.manual_seed(0)
        _, model, _ = fit(
            monitor, steps=2, model=models.CausalLM, data=models.tokens(n=8, batch_size=4)
        )
        return model

    plain = train(None)
    monitored = train(FisherMonitor())  # the defaults: the budget schedule measures step 0
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), monitored.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    _no_traces(monitored)


def test_a_failing_recorded_step_leaves_nothing_behind():
    class Failing(models.CausalLM):
        def training_step(self, batch, batch_idx):
            super().training_step(batch, batch_idx)
            raise RuntimeError("the user's step failed")

    model = Failing()
    with pytest.raises(RuntimeError, match="the user's step failed"):
        fit(FisherMonitor(), steps=1, model=model, data=models.tokens())
    _no_traces(model)


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`")
def test_a_step_without_backward_is_recorded_and_the_next_one_measured():
    class SkipsFirst(TinyClassifier):
        def training_step(self, batch, batch_idx):
            loss = F.cross_entropy(self(batch[0]), batch[1])
            return None if batch_idx == 0 else loss  # no backward, no optimizer step

    monitor = FisherMonitor(every_n_steps=1, raise_on_error=True)
    trainer, model, logger = fit(monitor, steps=2, model=SkipsFirst)
    # the second batch is still step 0, already recorded: the next step is measured
    assert logger.steps_with("~fisher/block/direction_cosine/all") == [1]
    assert first_values(logger, 1)["probe/batch_size"] == 16
    _no_traces(model)


def test_default_schedule_measures_the_first_step():
    _, _, logger = fit(FisherMonitor(), steps=3, model=models.ObjectClassifier)
    assert logger.steps_with("~fisher/block/direction_cosine/all")[0] == 0


# ---------------------------------------------------------------------- explicit arguments


def test_explicit_arguments_skip_the_recording_or_replace_what_it_finds():
    told = FisherMonitor(
        every_n_steps=1, loss_fn=nn.CrossEntropyLoss(), batch_to_inputs_targets=tuple
    )
    assert not told._discovery.wanted  # measured at the start of every step, as before
    _, _, logger = fit(told, steps=2)
    assert logger.steps_with("~fisher/block/direction_cosine/all") == [0, 1]
    # outputs= and the split given, the loss found: an LM measured with the user's layout
    monitor = FisherMonitor(
        every_n_steps=1,
        raise_on_error=True,
        outputs=lambda out: out[:, :-1].transpose(1, 2),
        batch_to_inputs_targets=lambda b: (
            {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]},
            b["input_ids"][:, 1:],
        ),
    )
    _, _, logger = fit(monitor, steps=1, model=models.CausalLM, data=models.tokens())
    assert logger.steps_with("~fisher/block/direction_cosine/all") == [0]
    with pytest.raises(ValueError, match="Invalid outputs: 3"):
        FisherMonitor(outputs=3)


def test_outputs_that_do_not_give_the_loss_input_are_refused():
    monitor = FisherMonitor(every_n_steps=1, raise_on_error=True, outputs=lambda out: out * 2)
    with pytest.raises(ValueError, match="cannot measure its loss.*outputs="):
        fit(monitor, steps=1, model=lambda: Written(FORMS["F.cross_entropy"][0]))


@pytest.mark.parametrize(
    ("loss_fn", "found", "measured"),
    [
        (nn.MSELoss(), "F.mse_loss(…) on output[1]", "MSELoss(reduction='mean')"),
        (
            nn.CrossEntropyLoss(),
            "F.cross_entropy(…) on output[0]",
            "CrossEntropyLoss(reduction='mean', ignore_index=-100)",
        ),
    ],
)
def test_loss_fn_says_which_of_several_losses_is_the_likelihood(loss_fn, found, measured):
    monitor = FisherMonitor(every_n_steps=1, raise_on_error=True, loss_fn=loss_fn)
    _, _, logger = fit(monitor, steps=1, model=models.TwoHeads)
    assert logger.steps_with("~fisher/block/direction_cosine/all") == [0]
    (note,) = [note for note in monitor._info.notes if note.startswith("loss found")]
    assert found in note
    assert monitor._info.settings["loss"] == measured
    with pytest.raises(ValueError, match="several losses"):
        fit(FisherMonitor(raise_on_error=True), steps=1, model=models.TwoHeads)
