"""FisherMonitor in real Trainer.fit runs: keys, steps, values, identical training, resume."""

from __future__ import annotations

import copy
import glob
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from fisher_monitor import FisherMonitor, measure, schedules
from fisher_monitor.keys import CONSTANT_METRICS, METRICS, parse_key
from lightning_helpers import MappedDataset, SpyLogger, TinyClassifier, fit, loader, trainer_kwargs

PROBE_KEYS = (
    "probe/loss",
    "probe/batch_size",
    "probe/grad_norm",
    "probe/seconds",
    "probe/overhead",
)


def test_documented_keys_arrive_at_scheduled_steps():
    monitor = FisherMonitor(every_n_steps=2, structures=("diag", "block", "kron"))
    _, _, logger = fit(monitor, steps=5)
    assert logger.steps_with("~fisher/block/direction_cosine/all") == [0, 2, 4]
    _, metrics = next(c for c in logger.calls if "~fisher/diag/kl/all" in c[1])
    for structure in ("diag", "block", "kron"):
        for metric in METRICS:
            for layer in ("net.0", "net.3", "all"):
                key = f"~fisher/{structure}/{metric}/{layer}"
                # constants are settings, not time series
                assert (key in metrics) == (metric not in CONSTANT_METRICS), key
    for key in PROBE_KEYS:
        assert f"~fisher/{key}" in metrics
    assert metrics["~fisher/probe/batch_size"] == 16
    assert 0 < metrics["~fisher/probe/overhead"] < 1
    # the dimensions went to the logger as hyperparameters: 4·8 + 8 and 8·3 + 3 parameters
    assert logger.hparams["~fisher/dimension/net.0"] == 40
    assert logger.hparams["~fisher/dimension/net.3"] == 27
    assert logger.hparams["~fisher/dimension/all"] == 67
    assert logger.hparams["~fisher/structures"] == "diag, block, kron"
    assert logger.hparams["~fisher/schedule"] == "every(2, offset=0)"


def test_absolute_damping_is_a_setting_and_relative_damping_a_time_series():
    absolute = FisherMonitor(every_n_steps=1, structures=("diag",), damping_mode="absolute")
    _, _, logger = fit(absolute, steps=1)
    assert not [key for key in logger.calls[-1][1] if "/damping/" in key]
    assert logger.hparams["~fisher/damping"] == 1e-3
    assert logger.hparams["~fisher/damping_mode"] == "absolute"
    relative = FisherMonitor(every_n_steps=1, structures=("diag",))
    _, _, logger = fit(relative, steps=1)
    assert "~fisher/diag/damping/all" in logger.calls[0][1]


def test_logged_values_equal_measure_on_the_same_weights_and_batch():
    torch.manual_seed(0)
    initial = TinyClassifier()
    reference_model = copy.deepcopy(initial)
    monitor = FisherMonitor(every_n_steps=100, structures=("diag", "block"), network="net")
    _, _, logger = fit(monitor, steps=2, model=initial)
    inputs, targets = next(iter(loader()))
    expected = measure(reference_model.net, nn.CrossEntropyLoss(), inputs, targets)
    for key, value in expected.scalars.items():
        parsed = parse_key(key)
        if key == "probe/seconds" or (parsed and parsed.metric in CONSTANT_METRICS):
            continue
        assert logger.value(f"~fisher/{key}", 0) == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_other_loggers_receive_the_scalars(tmp_path):
    monitor = FisherMonitor(every_n_steps=2, structures=("diag",))
    fit(monitor, steps=3, logger=CSVLogger(tmp_path))
    (metrics_file,) = glob.glob(str(tmp_path / "lightning_logs" / "version_0" / "metrics.csv"))
    header = open(metrics_file).readline()
    assert "~fisher/diag/direction_cosine/all" in header


@pytest.mark.parametrize("fisher", ["exact", "mc"])
def test_training_is_bit_identical_with_and_without_the_monitor(fisher):
    data_kwargs = dict(shuffle=True)
    model = lambda: TinyClassifier(dropout=0.3)  # noqa: E731
    _, plain, _ = fit(None, steps=6, model=model, data=loader(**data_kwargs))
    monitor = FisherMonitor(every_n_steps=1, structures=("diag", "block", "kron"), fisher=fisher)
    _, monitored, _ = fit(monitor, steps=6, model=model, data=loader(**data_kwargs))
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), monitored.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    for p in monitored.parameters():
        assert not hasattr(p, "fisher_monitor_factors")


def test_resume_continues_the_schedule_and_the_generator(tmp_path):
    """Resuming measures where the uninterrupted run would, with the same sampled labels.

    lr = 0 keeps the weights fixed and a fixed probe set the batch (Lightning may order the
    batches of a resumed epoch differently), so the Monte-Carlo values at step 6 agree only
    if the monitor's generator was restored from the checkpoint.
    """
    probe = next(iter(loader()))

    def monitor():
        return FisherMonitor(
            every_n_steps=3, structures=("block",), fisher="mc", mc_samples=2, probe_data=probe
        )

    def model():
        return TinyClassifier(lr=0.0)

    _, _, full = fit(monitor(), steps=8, model=model)
    assert full.steps_with("~fisher/block/kl/all") == [0, 3, 6]
    first, _, part1 = fit(monitor(), steps=4, model=model)
    checkpoint = tmp_path / "step4.ckpt"
    first.save_checkpoint(checkpoint)
    resumed_monitor = monitor()
    part2 = SpyLogger()
    trainer = pl.Trainer(max_steps=8, logger=part2, callbacks=[resumed_monitor], **trainer_kwargs())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model(), loader(), ckpt_path=checkpoint)
    assert part1.steps_with("~fisher/block/kl/all") == [0, 3]
    assert part2.steps_with("~fisher/block/kl/all") == [6]
    assert part2.value("~fisher/block/kl/all", 6) == full.value("~fisher/block/kl/all", 6)
    assert [step for step, _ in resumed_monitor.state_dict()["history"]] == [0, 3, 6]
    fresh = monitor()  # without the restored state the labels differ
    fresh_logger = SpyLogger()
    trainer = pl.Trainer(max_steps=8, logger=fresh_logger, callbacks=[fresh], **trainer_kwargs())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh.load_state_dict = lambda state: None
        trainer.fit(model(), loader(), ckpt_path=checkpoint)
    assert fresh_logger.value("~fisher/block/kl/all", 6) != full.value("~fisher/block/kl/all", 6)


def test_works_with_the_lightning_namespace():
    import lightning.pytorch as L

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
            self.loss_fn = nn.CrossEntropyLoss()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return self.loss_fn(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Spy(L.loggers.Logger):
        def __init__(self):
            super().__init__()
            self.steps = []

        name = "spy"
        version = 0

        def log_metrics(self, metrics, step=None):
            if "~fisher/block/direction_cosine/all" in metrics:
                self.steps.append(step)

        def log_hyperparams(self, *args, **kwargs):
            pass

    logger = Spy()
    trainer = L.Trainer(
        max_steps=3, logger=logger, callbacks=[FisherMonitor(every_n_steps=1)], **trainer_kwargs()
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Classifier(), loader())
    assert logger.steps == [0, 1, 2]


def test_probe_size_probe_data_network_and_loss_options():
    inputs, targets = next(iter(loader(batch_size=32)))
    monitor = FisherMonitor(
        every_n_steps=1,
        structures=("diag",),
        network=lambda module: module.net,
        loss_fn="cross_entropy",
        probe_data=(inputs, targets),
        probe_size=10,
    )
    _, _, logger = fit(monitor, steps=3, model=TinyClassifier(lr=0.0))
    assert logger.value("~fisher/probe/batch_size", 0) == 10
    # a fixed probe and unchanged weights: the same numbers at every step
    values = [logger.value("~fisher/diag/kl/all", s) for s in range(3)]
    assert values[0] == values[1] == values[2]

    dataloader_probe = FisherMonitor(
        every_n_steps=1,
        structures=("diag",),
        network="net",
        probe_data=loader(batch_size=8, shuffle=True),
    )
    _, _, logger = fit(dataloader_probe, steps=2, model=TinyClassifier(lr=0.0))
    assert logger.value("~fisher/probe/batch_size", 1) == 8


def test_dict_batches_and_custom_splitter():
    dict_data = MappedDataset(lambda i, x, y: {"image": x, "label": y, "id": i})

    class DictClassifier(TinyClassifier):
        def training_step(self, batch, batch_idx):
            return self.loss_fn(self(batch["image"]), batch["label"])

    data = torch.utils.data.DataLoader(dict_data, batch_size=16)
    _, _, logger = fit(
        FisherMonitor(every_n_steps=1, structures=("diag",)),
        steps=2,
        model=DictClassifier(),
        data=data,
    )
    assert logger.steps_with("~fisher/diag/kl/all") == [0, 1]
    splitter = FisherMonitor(
        every_n_steps=1,
        structures=("diag",),
        batch_to_inputs_targets=lambda b: (b["image"], b["label"]),
    )
    _, _, logger = fit(splitter, steps=1, model=DictClassifier(), data=data)
    assert logger.steps_with("~fisher/diag/kl/all") == [0]


def test_gradient_accumulation_measures_once_per_optimizer_step():
    _, _, logger = fit(
        FisherMonitor(every_n_steps=1, structures=("diag",)), steps=3, accumulate_grad_batches=2
    )
    assert logger.steps_with("~fisher/diag/kl/all") == [0, 1, 2]


def test_prog_bar_and_log_spaced_schedule():
    monitor = FisherMonitor(
        schedule=schedules.log_spaced(per_decade=4),
        structures=("diag",),
        prog_bar="diag/direction_cosine/all",
    )
    trainer, _, logger = fit(monitor, steps=12)
    assert logger.steps_with("~fisher/diag/kl/all") == [0, 1, 2, 4, 6, 10]
    assert "cos_dir/diag" in trainer.progress_bar_metrics  # a short name the bar shows whole


class AdamClassifier(TinyClassifier):
    """TinyClassifier trained with Adam, two parameter groups and a learning-rate schedule."""

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(
            [
                {"params": self.net[0].parameters(), "lr": 0.05},
                {"params": self.net[3].parameters(), "lr": 0.01, "weight_decay": 0.1},
            ]
        )
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]


def test_training_is_bit_identical_with_the_optimizer_audit_adam_and_accumulation():
    def model():
        return AdamClassifier(dropout=0.3)

    kwargs = dict(steps=5, model=model, data=loader(shuffle=True), accumulate_grad_batches=2)
    plain_trainer, plain, _ = fit(None, **kwargs)
    monitor = FisherMonitor(every_n_steps=1, structures=("diag", "block"))
    monitored_trainer, monitored, logger = fit(monitor, **kwargs)
    assert logger.steps_with("~fisher/block/update_nat_cosine/all") == [0, 1, 2, 3, 4]
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), monitored.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    plain_state = plain_trainer.optimizers[0].state_dict()["state"]
    monitored_state = monitored_trainer.optimizers[0].state_dict()["state"]
    for index, state in plain_state.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(monitored_state[index][key]))
    assert not monitor._recorder.armed  # the one-shot hook is gone


@pytest.mark.slow
def test_default_budget_spreads_measurements_over_a_300_step_digits_run():
    """With every default, a 300-step MLP run on digits gets at least 8 measurements, some in
    each third. A fake clock makes it deterministic: a training step takes 1 s and a
    measurement 1.5 s, so the 5% budget allows one measurement per 30 steps of training."""
    from lightning_helpers import DigitsMLP, FakeClock, Ticker, TickingLogger, digits_loader

    clock = FakeClock()
    logger = TickingLogger(clock, seconds=1.5)
    monitor = FisherMonitor(schedule=schedules.budget(clock=clock))
    fit(
        monitor,
        steps=300,
        logger=logger,
        model=DigitsMLP(),
        data=digits_loader(),
        callbacks=[Ticker(clock, 1.0)],
    )
    steps = logger.steps_with("~fisher/probe/loss")
    assert len(steps) >= 8, steps
    assert steps[0] == 0
    for third in range(3):
        assert any(100 * third <= step < 100 * (third + 1) for step in steps), steps
    # the monitor's share stays within the budget plus one measurement, and tends to 5%
    shares = [m["~fisher/probe/overhead"] for _, m in logger.calls if "~fisher/probe/overhead" in m]
    total = 300 * 1.0 + 1.5 * len(steps)
    assert monitor._ledger.spent == pytest.approx(1.5 * len(steps))
    assert monitor._ledger.spent / total <= 0.05 + 1.5 / total
    assert shares[-1] < 0.06


@pytest.mark.slow
def test_default_monitor_measures_a_real_300_step_digits_run_at_least_8_times(tmp_path):
    """``FisherMonitor()`` as a user adds it, on the real clock: wherever one measurement
    costs more than 5% allows, the guaranteed measurements still spread over the fit."""
    import json

    from pytorch_lightning.loggers import TensorBoardLogger

    from lightning_helpers import DigitsMLP, digits_loader

    monitor = FisherMonitor()
    logger = TensorBoardLogger(tmp_path)
    fit(monitor, steps=300, logger=logger, model=DigitsMLP(), data=digits_loader())
    (run_file,) = glob.glob(str(tmp_path / "**" / "fisher_monitor-*.json"), recursive=True)
    steps = json.loads(open(run_file).read())["fit"]["steps"]
    assert len(steps) >= 8, steps
    assert steps[0] == 0 and steps[-1] >= 270, steps
    assert sum(step >= 150 for step in steps) >= 3, steps  # spread, not only early


def test_the_fit_length_is_read_without_loading_the_training_data_early(tmp_path):
    """The module's own on_fit_start may still change its data loader (here its batch size):
    the monitor reads the fit's length only once the loader exists."""

    class LateBatchSize(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net, self.loss_fn, self.batch_size, self.sizes = (
                nn.Linear(4, 3),
                nn.CrossEntropyLoss(),
                8,
                set(),
            )

        def on_fit_start(self):
            self.batch_size = 32

        def train_dataloader(self):
            generator = torch.Generator().manual_seed(0)
            data = torch.utils.data.TensorDataset(
                torch.randn(256, 4, generator=generator),
                torch.randint(0, 3, (256,), generator=generator),
            )
            return torch.utils.data.DataLoader(data, batch_size=self.batch_size)

        def training_step(self, batch, batch_idx):
            self.sizes.add(len(batch[0]))
            return self.loss_fn(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model, monitor = LateBatchSize(), FisherMonitor(structures=("diag",))
    pl.Trainer(
        max_epochs=1, logger=CSVLogger(tmp_path), callbacks=[monitor], **trainer_kwargs()
    ).fit(model)
    assert model.sizes == {32}
    assert monitor.schedule.total_steps == 8  # 256 samples in batches of 32


def test_budget_state_survives_a_checkpoint(tmp_path):
    from lightning_helpers import FakeClock, Ticker, TickingLogger

    clock = FakeClock()
    monitor = FisherMonitor(schedule=schedules.budget(0.2, clock=clock), structures=("diag",))
    trainer, _, _ = fit(
        monitor,
        steps=6,
        logger=TickingLogger(clock, seconds=1.0),
        callbacks=[Ticker(clock, 1.0)],
    )
    checkpoint = tmp_path / "budget.ckpt"
    trainer.save_checkpoint(checkpoint)
    saved = monitor.state_dict()
    assert saved["schedule"]["spent"] == monitor.schedule.spent > 0
    assert saved["schedule"]["elapsed"] == pytest.approx(clock.now)
    resumed = FisherMonitor(schedule=schedules.budget(0.2, clock=clock), structures=("diag",))
    resumed.load_state_dict(
        torch.load(checkpoint, weights_only=False)["callbacks"][resumed.state_key]
    )
    assert resumed.schedule.spent == saved["schedule"]["spent"]
    assert resumed.schedule.elapsed == saved["schedule"]["elapsed"]
    assert resumed._ledger.spent == saved["time"]["spent"]


def test_keys_follow_the_loggers_group_separator():
    class DotLogger(SpyLogger):
        @property
        def group_separator(self):
            return "."

    _, _, logger = fit(
        FisherMonitor(every_n_steps=1, structures=("diag",)), steps=1, logger=DotLogger()
    )
    assert "~fisher.diag.kl.all" in logger.calls[0][1]
    assert "~fisher.probe.loss" in logger.calls[0][1]
