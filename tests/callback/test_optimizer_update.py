"""The optimizer audit in real fits: the applied update is recorded exactly (Adam with two
parameter groups, a learning-rate schedule and gradient accumulation; manual optimization
with two optimizers), and its cosines equal ``measure(..., update=Δθ)`` on the same
weights, batch and update."""

from __future__ import annotations

import copy
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from fisher_monitor import FisherMonitor, measure
from lightning_helpers import TinyClassifier, fit

STRUCTURES = ("diag", "block")


class AdamGroups(TinyClassifier):
    def configure_optimizers(self):
        optimizer = torch.optim.Adam(
            [
                {"params": self.net[0].parameters(), "lr": 0.05},
                {"params": self.net[3].parameters(), "lr": 0.02, "weight_decay": 0.1},
            ]
        )
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]


class TwoOptimizers(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        loss = self.loss_fn(self(batch[0]), batch[1])
        self.manual_backward(loss)
        first.step()
        second.step()
        first.zero_grad()
        second.zero_grad()

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.net[0].parameters(), lr=0.1, momentum=0.9),
            torch.optim.RMSprop(self.net[3].parameters(), lr=0.01),
        )


class Weights(pl.Callback):
    """Keeps the weights and the batch at the first micro-batch of every optimizer step."""

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.batches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if step not in self.weights:
            self.weights[step] = copy.deepcopy(pl_module.state_dict())
            self.batches[step] = (batch[0].clone(), batch[1].clone())

    def on_train_end(self, trainer, pl_module):
        self.weights[trainer.global_step] = copy.deepcopy(pl_module.state_dict())


def expected_cosines(model_class, weights: Weights, step: int) -> dict[str, float]:
    """``measure()`` at the step's weights and batch with Δθ = θ_next − θ_step (the next step
    recorded: with two optimizers ``global_step`` advances by two per training step)."""
    model = model_class()
    model.load_state_dict(weights.weights[step])
    after = weights.weights[min(s for s in weights.weights if s > step)]
    update = {name: after[name] - p.detach() for name, p in model.named_parameters()}
    inputs, targets = weights.batches[step]
    result = measure(
        model, nn.CrossEntropyLoss(), inputs, targets, structures=STRUCTURES, update=update
    )
    return {key: value for key, value in result.scalars.items() if "/update_" in key}


@pytest.mark.parametrize(
    ("model_class", "kwargs"),
    [
        (AdamGroups, dict(accumulate_grad_batches=2)),
        (TwoOptimizers, dict()),
    ],
    ids=["adam-groups-schedule-accumulation", "manual-two-optimizers"],
)
def test_logged_update_cosines_equal_measure_with_the_applied_update(model_class, kwargs):
    weights = Weights()
    index = 1 if model_class is TwoOptimizers else 0  # the optimizer that steps last
    monitor = FisherMonitor(every_n_steps=2, structures=STRUCTURES, optimizer_index=index)
    _, _, logger = fit(monitor, steps=6, model=model_class, callbacks=[weights], **kwargs)
    measured = logger.steps_with("~fisher/block/update_nat_cosine/all")
    assert measured == [0, 2, 4]
    for step in measured:
        expected = expected_cosines(model_class, weights, step)
        assert expected  # the reference has the keys
        for key, value in expected.items():
            assert logger.value(f"~fisher/{key}", step) == pytest.approx(
                value, rel=1e-9, abs=1e-12
            ), (
                step,
                key,
            )


def test_preconditioner_audit_of_adam_is_logged_with_its_histograms(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    monitor = FisherMonitor(every_n_steps=2, structures=("diag",))
    fit(monitor, steps=3, model=AdamGroups, logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("~fisher/optimizer/preconditioner_ef_cosine/all")]
    assert steps == [0, 2]
    assert (
        -1 <= events.Scalars("~fisher/optimizer/preconditioner_fisher_cosine/net.0")[0].value <= 1
    )
    assert (
        "~fisher/histograms/log10_preconditioner_over_sqrt_f/net.3" in events.Tags()["histograms"]
    )
    assert monitor._info.settings["preconditioner"] is True


def test_audit_can_be_turned_off_and_a_missing_optimizer_is_said():
    _, _, logger = fit(
        FisherMonitor(every_n_steps=1, structures=("diag",), audit_optimizer=False), steps=2
    )
    assert not [key for _, metrics in logger.calls for key in metrics if "update_" in key]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, logger = fit(
            FisherMonitor(every_n_steps=1, structures=("diag",), optimizer_index=3), steps=2
        )
    assert any("optimizer_index=3" in str(w.message) for w in caught)
    assert logger.steps_with("~fisher/diag/kl/all") == [0, 1]
    assert not [key for _, metrics in logger.calls for key in metrics if "update_" in key]


def test_the_copy_is_freed_and_the_hook_removed():
    trainer, _, _ = fit(FisherMonitor(every_n_steps=1, structures=("diag",)), steps=3)
    monitor = next(c for c in trainer.callbacks if isinstance(c, FisherMonitor))
    assert not monitor._recorder.armed
    assert not trainer.optimizers[0]._optimizer_step_post_hooks
    assert not monitor.last_measurement.directions  # only the audit needed them
