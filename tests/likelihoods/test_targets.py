"""Targets of the wrong type get a message naming the dtype, the loss and the fix (issue 21)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fisher_monitor import FisherMonitor, measure
from fisher_monitor.likelihoods import Bernoulli, Categorical, CategoricalLogProbs, Gaussian
from lightning_helpers import fit

ONE_HOT_FIX = r"batch_to_inputs_targets=lambda batch: \(batch\[0\], batch\[1\]\.argmax\(dim=1\)\)"
LONG_FIX = r"batch_to_inputs_targets=lambda batch: \(batch\[0\], batch\[1\]\.long\(\)\)"
FLOAT_FIX = r"batch_to_inputs_targets=lambda batch: \(batch\[0\], batch\[1\]\.float\(\)\)"


@pytest.mark.parametrize("likelihood", [Categorical(), CategoricalLogProbs()])
@pytest.mark.parametrize(
    ("targets", "match"),
    [
        (
            torch.tensor([0, 2, 1, 1], dtype=torch.int32),
            rf"int64 \(torch.long\), got torch.int32.*{LONG_FIX}",
        ),
        (torch.tensor([0, 2, 1, 1], dtype=torch.uint8), r"got torch.uint8 targets"),
        (torch.tensor([0.0, 2.0, 1.0, 1.0]), rf"got torch.float32 class labels.*{LONG_FIX}"),
        (torch.eye(3)[[0, 2, 1, 1]], rf"one-hot or class-probability.*{ONE_HOT_FIX}"),
        (torch.tensor([True, False, True, True]), r"got torch.bool class labels"),
    ],
)
def test_class_targets_of_the_wrong_type(likelihood, targets, match):
    outputs = torch.zeros(4, 3).log_softmax(dim=1)
    with pytest.raises(ValueError, match=match):
        likelihood.check_batch(outputs, targets)


def test_binary_and_regression_targets_must_be_floating_point():
    with pytest.raises(
        ValueError, match=rf"floating-point 0/1 targets, got torch.int64.*{FLOAT_FIX}"
    ):
        Bernoulli().check_batch(torch.zeros(4, 1), torch.ones(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"floating-point targets, got torch.int32.*{FLOAT_FIX}"):
        Gaussian().check_batch(torch.zeros(4, 2), torch.ones(4, 2, dtype=torch.int32))


@pytest.mark.parametrize(
    ("loss", "outputs", "targets", "match"),
    [
        (nn.CrossEntropyLoss(), 3, torch.randint(0, 3, (6,), dtype=torch.int32), "torch.int32"),
        (nn.BCEWithLogitsLoss(), 1, torch.randint(0, 2, (6, 1)), "floating-point 0/1"),
    ],
)
def test_measure_names_the_dtype_instead_of_a_pytorch_error(loss, outputs, targets, match):
    with pytest.raises(ValueError, match=match):
        measure(nn.Linear(2, outputs), loss, torch.randn(6, 2), targets)


def test_monitor_with_a_hand_written_split_says_how_to_fix_float_labels():
    """Labels stored as floats (cast in training_step) and a hand-written split that passes
    them on: the warning points to `batch_to_inputs_targets` with `.long()`, not argmax."""
    monitor = FisherMonitor(
        every_n_steps=1,
        loss_fn=nn.CrossEntropyLoss(),
        batch_to_inputs_targets=lambda batch: (batch[0], batch[1].float()),
    )
    with pytest.warns(UserWarning, match=rf"float32 class labels.*{LONG_FIX}"):
        _, _, logger = fit(monitor, steps=2)
    assert not logger.steps_with("~fisher/probe/loss")
