"""Issue 21, item 8: causes that can never pass switch the monitor off with one warning.

A fixed probe set (``probe_data``) is the same at every step: if the network or the loss
refuses it, no later step can measure, so "it tries again at the next scheduled step" was
wrong; likewise one sample above the memory budget. Real ``Trainer.fit`` runs.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from fisher_monitor import FisherMonitor
from lightning_helpers import fit

STEPS = 6


def fitted_warnings(monitor) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _, logger = fit(monitor, steps=STEPS)
    assert trainer.global_step == STEPS  # training went on
    return [str(w.message) for w in caught if "`FisherMonitor`" in str(w.message)], logger


@pytest.mark.parametrize(
    "probe",
    [
        (torch.randn(8, 4), torch.full((8,), 7)),  # class labels beyond the 3 classes
        (torch.randn(8, 5), torch.zeros(8, dtype=torch.long)),  # 5 features, not 4
    ],
    ids=["labels out of range", "wrong input width"],
)
def test_a_fixed_probe_the_network_refuses_switches_the_monitor_off(probe):
    monitor = FisherMonitor(every_n_steps=1, probe_data=probe)
    found, logger = fitted_warnings(monitor)
    (warning,) = found
    assert "`probe_data`" in warning and "cannot pass later" in warning
    assert "The monitor is off for the rest of this fit" in warning
    assert "tries again" not in warning
    assert monitor._policy.off is not None
    assert not [metrics for _, metrics in logger.calls if any("fisher" in k for k in metrics)]


def test_the_same_bad_labels_in_a_training_batch_are_retried():
    """Only a fixed probe is the same at every step: a training batch may differ."""

    def split(batch):
        inputs, targets = batch
        return inputs, torch.full_like(targets, 7)

    monitor = FisherMonitor(every_n_steps=1, batch_to_inputs_targets=split)
    found, _ = fitted_warnings(monitor)
    (warning,) = found
    assert "tries again" in warning and monitor._policy.off is None


def test_one_sample_over_the_memory_budget_switches_the_monitor_off():
    monitor = FisherMonitor(every_n_steps=1, memory_budget=1)
    found, _ = fitted_warnings(monitor)
    (warning,) = found
    assert "Even one probe sample" in warning and "No probe size can fit" in warning
    assert "The monitor is off for the rest of this fit" in warning
    assert "tries again" not in warning
