"""The monitor never stops training: one warning per cause with its fix, retry or switch off,
and ``raise_on_error=True`` for the strict behaviour. Real ``Trainer.fit`` runs."""

from __future__ import annotations

import re
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn

from fisher_monitor import FisherMonitor
from lightning_helpers import MappedDataset, TinyClassifier, fit, loader, trainer_kwargs


def monitor_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "`FisherMonitor`" in str(w.message)]


def fit_warning(monitor, **kwargs):
    """Fit, returning the logger and the monitor's warnings (training must complete)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _, logger = fit(monitor, **kwargs)
    assert trainer.global_step == kwargs.get("steps", 5)  # training was not stopped
    return logger, monitor_warnings(caught)


def test_no_logger_is_an_error_at_setup():
    trainer = pl.Trainer(max_steps=1, logger=False, callbacks=[FisherMonitor()], **trainer_kwargs())
    with pytest.raises(
        MisconfigurationException,
        match=r"Cannot use `FisherMonitor` callback with `Trainer\(logger=False\)`",
    ):
        trainer.fit(TinyClassifier(), loader())


class HandWritten(TinyClassifier):
    """Computes its negative log-likelihood by hand: no loss function, no loss module."""

    def __init__(self):
        super().__init__()
        del self.loss_fn

    def training_step(self, batch, batch_idx):
        log_probs = self(batch[0]).log_softmax(dim=1)
        return -log_probs.gather(1, batch[1][:, None]).mean()


class TwoLosses(HandWritten):
    """Two heads: a classification and a regression of the first input, two losses (and no
    loss module to tell which is the likelihood)."""

    def __init__(self):
        super().__init__()
        self.regression = nn.Linear(4, 1)

    def forward(self, x):
        return self.net(x), self.regression(x)

    def training_step(self, batch, batch_idx):
        logits, prediction = self(batch[0])
        regression = nn.functional.mse_loss(prediction.squeeze(1), batch[0][:, 0])
        return nn.functional.cross_entropy(logits, batch[1]) + regression


def smoothed_loss() -> TinyClassifier:
    model = TinyClassifier()
    model.loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    return model


LOSS_CASES = [
    (HandWritten, "found no loss module on HandWritten.*loss_fn=nn.CrossEntropyLoss"),
    (TwoLosses, r"several losses \(F.cross_entropy\(…\), F.mse_loss\(…\)\).*`loss_fn=`"),
    (smoothed_loss, "found the loss `loss_fn`.*label_smoothing"),
]


@pytest.mark.parametrize(("model", "message"), LOSS_CASES)
def test_missing_and_ambiguous_losses_warn_once_and_training_goes_on(model, message):
    logger, caught = fit_warning(FisherMonitor(every_n_steps=1), steps=3, model=model)
    assert len(caught) == 1
    # the loss is looked for in the first measured step, which is therefore skipped
    assert caught[0].startswith("`FisherMonitor` skipped the measurement at step 0")
    assert re.search(message, caught[0])
    assert "The monitor is off for the rest of this fit; training continues." in caught[0]
    assert not logger.steps_with("~fisher/probe/loss")


@pytest.mark.parametrize(("model", "message"), LOSS_CASES)
def test_missing_and_ambiguous_losses_raise_in_strict_mode(model, message):
    with pytest.raises(ValueError, match=message):
        fit(FisherMonitor(raise_on_error=True), steps=1, model=model)


def gelu_model() -> TinyClassifier:
    model = TinyClassifier()
    model.net[1] = nn.RReLU()
    return model


def test_unsupported_network():
    with pytest.raises(NotImplementedError, match=r"module\(s\) '1' \(RReLU\)"):
        fit(
            FisherMonitor(network="net", backend="backpack", raise_on_error=True),
            steps=1,
            model=gelu_model,
        )
    logger, caught = fit_warning(
        FisherMonitor(network="net", backend="backpack"), steps=2, model=gelu_model
    )
    assert len(caught) == 1 and "RReLU" in caught[0] and "backend='auto'" in caught[0]
    # by default the next backend (autograd with module hooks) takes over, and says so
    monitor = FisherMonitor(network="net", every_n_steps=1, structures=("diag", "block"))
    _, _, logger = fit(monitor, steps=2, model=gelu_model)
    assert logger.steps_with("~fisher/block/direction_cosine/all") == [0, 1]
    assert any("autograd" in note for note in monitor.last_measurement.notes)
    with pytest.raises(ValueError, match="has no attribute 'backbone'"):
        fit(FisherMonitor(network="backbone", raise_on_error=True), steps=1)


class NoForward(TinyClassifier):
    forward = pl.LightningModule.forward

    def training_step(self, batch, batch_idx):
        return self.loss_fn(self.net(batch[0]), batch[1])


class TwoParts(NoForward):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 3)


def test_module_without_forward_uses_the_submodule_holding_the_parameters():
    _, _, logger = fit(
        FisherMonitor(every_n_steps=1, structures=("diag",)), steps=2, model=NoForward()
    )
    assert "~fisher/diag/kl/0" in logger.calls[0][1]  # layers named inside `net`
    with pytest.raises(ValueError, match="defines no forward\\(\\) and no single submodule"):
        fit(FisherMonitor(raise_on_error=True), steps=1, model=TwoParts())
    _, caught = fit_warning(FisherMonitor(), steps=2, model=TwoParts())
    assert len(caught) == 1 and "network='<attribute>'" in caught[0]


class Branchy(TinyClassifier):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.net(x)
        return self.net(-x)


def test_untraceable_forward_is_named():
    with pytest.raises(
        NotImplementedError, match="cannot trace the forward pass of Branchy with torch.fx"
    ):
        fit(FisherMonitor(backend="backpack", raise_on_error=True), steps=1, model=Branchy())
    # torch.func follows data-dependent control flow: "auto" measures it
    monitor = FisherMonitor(every_n_steps=1, structures=("diag",))
    _, _, logger = fit(monitor, steps=2, model=Branchy())
    assert logger.steps_with("~fisher/diag/kl/all") == [0, 1]


class OnlyInputs(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        return torch.randn(4)


class Unsupervised(TinyClassifier):
    def training_step(self, batch, batch_idx):
        return self(batch).square().mean()


def test_batch_that_cannot_be_split():
    data = torch.utils.data.DataLoader(OnlyInputs(), batch_size=8)
    with pytest.raises(
        ValueError, match="cannot split a batch of type Tensor.*batch_to_inputs_targets"
    ):
        fit(
            FisherMonitor(every_n_steps=100, raise_on_error=True),
            steps=3,
            model=Unsupervised(),
            data=data,
        )
    logger, caught = fit_warning(
        FisherMonitor(every_n_steps=1), steps=3, model=Unsupervised(), data=data
    )
    assert len(caught) == 1
    assert "skipped the measurement at step 0" in caught[0] and "monitor is off" in caught[0]
    assert not logger.steps_with("~fisher/probe/loss")


class MaskedClassifier(TinyClassifier):
    """Takes ``(x, mask, y)`` batches; ``forward(x, mask)``."""

    def forward(self, x, mask):
        return self.net(x * mask)

    def training_step(self, batch, batch_idx):
        x, mask, y = batch
        return self.loss_fn(self(x, mask), y)


def test_forward_missing_an_argument_suggests_batch_to_inputs_targets():
    data = torch.utils.data.DataLoader(
        MappedDataset(lambda i, x, y: (x, (x > -1).float(), y)), batch_size=16
    )
    # found from the recorded step: forward(batch[0], batch[1]), targets batch[2]
    _, _, logger = fit(
        FisherMonitor(every_n_steps=1, structures=("diag",)),
        steps=2,
        model=MaskedClassifier(),
        data=data,
    )
    assert logger.steps_with("~fisher/diag/kl/all") == [0, 1]
    # a hand-written split that leaves the mask out gets the advice
    logger, caught = fit_warning(
        FisherMonitor(
            every_n_steps=1,
            structures=("diag",),
            loss_fn=nn.CrossEntropyLoss(),
            batch_to_inputs_targets=lambda batch: (batch[0], batch[2]),
        ),
        steps=3,
        model=MaskedClassifier(),
        data=data,
    )
    assert len(caught) == 1, caught
    assert "forward() missing 1 required positional argument: 'mask'" in caught[0]
    assert "batch_to_inputs_targets=lambda batch: ((batch[0], batch[1]), batch[2])" in caught[0]
    assert not logger.steps_with("~fisher/probe/loss")
    # the suggested splitter works as written
    fixed = FisherMonitor(
        every_n_steps=1,
        structures=("diag",),
        batch_to_inputs_targets=lambda batch: ((batch[0], batch[1]), batch[2]),
    )
    _, _, logger = fit(fixed, steps=2, model=MaskedClassifier(), data=data)
    assert logger.steps_with("~fisher/diag/kl/all") == [0, 1]


def test_a_failing_measurement_warns_once_and_training_continues():
    nan_data = MappedDataset(
        lambda i, x, y: ((torch.full_like(x, float("nan")) if 16 <= i < 48 else x), y)
    )

    class Robust(TinyClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.loss_fn(self(torch.nan_to_num(x)), y)

    data = torch.utils.data.DataLoader(nan_data, batch_size=16)
    with pytest.warns(
        UserWarning,
        match=r"skipped the measurement at step 1 \(FloatingPointError: The probe loss is nan",
    ) as caught:
        _, _, logger = fit(
            FisherMonitor(every_n_steps=1, structures=("diag",)), steps=4, model=Robust(), data=data
        )
    assert logger.steps_with("~fisher/diag/kl/all") == [0, 3]  # retried, and measured again
    (message,) = monitor_warnings(caught)
    assert "check the data and the learning rate" in message
    assert "tries again at the next scheduled step" in message


class Lazy(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.LazyLinear(8), nn.Tanh(), nn.Linear(8, 3))


def test_lazy_modules_are_retried_until_their_shapes_are_known():
    # the recorded first step gives the lazy modules their shapes before it is measured
    logger, caught = fit_warning(
        FisherMonitor(every_n_steps=1, structures=("diag",)), steps=3, model=Lazy()
    )
    assert caught == [] and logger.steps_with("~fisher/diag/kl/all") == [0, 1, 2]
    # told everything, the monitor measures at the start of a step: the first one waits
    explicit = FisherMonitor(
        every_n_steps=1,
        structures=("diag",),
        loss_fn=nn.CrossEntropyLoss(),
        batch_to_inputs_targets=lambda batch: tuple(batch),
    )
    logger, caught = fit_warning(explicit, steps=3, model=Lazy())
    assert len(caught) == 1 and "skipped the measurement at step 0" in caught[0]
    assert "lazy" in caught[0] and "Nothing to do" in caught[0]
    assert logger.steps_with("~fisher/diag/kl/all") == [1, 2]


def test_a_failing_optimizer_audit_warns_and_training_goes_on(monkeypatch):
    import fisher_monitor.audit as audit

    def broken(measurement, update):
        raise RuntimeError("simulated audit failure")

    monkeypatch.setattr(audit, "update_cosines", broken)
    logger, caught = fit_warning(
        FisherMonitor(every_n_steps=1, structures=("diag",)), steps=3, model=TinyClassifier()
    )
    assert len(caught) == 1 and "RuntimeError: simulated audit failure" in caught[0]
    assert logger.steps_with("~fisher/diag/kl/all") == [0, 1, 2]  # measurements go on
    with pytest.raises(RuntimeError, match="simulated audit failure"):
        fit(FisherMonitor(every_n_steps=1, structures=("diag",), raise_on_error=True), steps=2)


def test_the_same_failure_with_other_numbers_warns_once_but_switching_off_is_news():
    from fisher_monitor.callback.failures import FailurePolicy

    policy = FailurePolicy(raise_on_error=False)
    cause = "NumericalError: in block/fc1: direction_cosine = {} is outside its range"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy.handle([cause.format(5.0)], 0, "measure")
        policy.handle([cause.format(4.99)], 1, "measure")  # same reason: not repeated
        policy.handle(["ValueError: bad setting 3"], 2, "measure")  # transient here
        policy.handle(["ValueError: bad setting 4"], None, "prepare")  # now it switches off
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3, messages
    assert "tries again" in messages[0] and "tries again" in messages[1]
    assert "off for the rest of this fit" in messages[2]
    assert policy.warnings == messages
