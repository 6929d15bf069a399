"""FisherMonitor in real Trainer.fit runs: keys, steps, TensorBoard, identical training, resume."""

from __future__ import annotations

import copy
import glob
import warnings

import pytest
import pytorch_lightning as pl
import torch
from lightning_helpers import MappedDataset, SpyLogger, TinyClassifier, fit, loader, trainer_kwargs
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from fisher_monitor import FisherMonitor, measure, schedules
from fisher_monitor.metrics import METRICS

PROBE_KEYS = ("probe/loss", "probe/batch_size", "probe/grad_norm", "probe/seconds")


def test_documented_keys_arrive_at_scheduled_steps():
    monitor = FisherMonitor(every_n_steps=2, structures=("diag", "block", "kron"))
    _, _, logger = fit(monitor, steps=5)
    assert logger.steps_with("fisher/block/direction_cosine/all") == [0, 2, 4]
    _, metrics = next(c for c in logger.calls if "fisher/diag/kl/all" in c[1])
    for structure in ("diag", "block", "kron"):
        for metric in METRICS:
            for layer in ("net.0", "net.3", "all"):
                assert f"fisher/{structure}/{metric}/{layer}" in metrics
    for key in PROBE_KEYS:
        assert f"fisher/{key}" in metrics
    assert metrics["fisher/probe/batch_size"] == 16


def test_logged_values_equal_measure_on_the_same_weights_and_batch():
    torch.manual_seed(0)
    initial = TinyClassifier()
    reference_model = copy.deepcopy(initial)
    monitor = FisherMonitor(every_n_steps=100, structures=("diag", "block"), network="net")
    _, _, logger = fit(monitor, steps=2, model=initial)
    inputs, targets = next(iter(loader()))
    expected = measure(reference_model.net, nn.CrossEntropyLoss(), inputs, targets)
    for key, value in expected.scalars.items():
        if key != "probe/seconds":
            assert logger.value(f"fisher/{key}", 0) == pytest.approx(value, rel=1e-9, abs=1e-12), (
                key
            )


def test_tensorboard_event_file_holds_scalars_histograms_layout_image_and_settings(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2

    monitor = FisherMonitor(every_n_steps=2, structures=("diag", "block"))
    fit(monitor, steps=5, logger=TensorBoardLogger(tmp_path))
    (event_file,) = glob.glob(str(tmp_path / "lightning_logs" / "version_0" / "events.*"))
    events = EventAccumulator(
        event_file, size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0}
    )
    events.Reload()
    tags = events.Tags()
    assert [e.step for e in events.Scalars("fisher/block/direction_cosine/all")] == [0, 2, 4]
    assert "fisher/diag/trace_ratio/net.0" in tags["scalars"]
    assert set(tags["histograms"]) == {
        "fisher/histograms/log10_ef_over_f/net.0",
        "fisher/histograms/log10_ef_over_f/net.3",
    }
    assert [e.step for e in events.Histograms("fisher/histograms/log10_ef_over_f/net.0")] == [
        0,
        2,
        4,
    ]
    images = events.Images("fisher/images/direction_cosine")
    # drawn at the first measurement and, with all three, at the end of training
    assert [e.step for e in images] == [0, 4] and images[-1].width > 100
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    titles = {category.title for category in layout.category}
    assert {"fisher: diag", "fisher: block", "fisher: probe"} <= titles
    block = next(c for c in layout.category if c.title == "fisher: block")
    chart = next(c for c in block.chart if c.title == "direction_cosine (layers)")
    assert list(chart.multiline.tag) == [r"fisher/block/direction_cosine(@[^/]*)?/.*"]
    text = events.Tensors("fisher/settings/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| fisher | exact |" in text and "| net.0 | Linear |" in text


def test_other_loggers_receive_the_scalars(tmp_path):
    monitor = FisherMonitor(every_n_steps=2, structures=("diag",))
    fit(monitor, steps=3, logger=CSVLogger(tmp_path))
    (metrics_file,) = glob.glob(str(tmp_path / "lightning_logs" / "version_0" / "metrics.csv"))
    header = open(metrics_file).readline()
    assert "fisher/diag/direction_cosine/all" in header


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
    assert full.steps_with("fisher/block/kl/all") == [0, 3, 6]
    first, _, part1 = fit(monitor(), steps=4, model=model)
    checkpoint = tmp_path / "step4.ckpt"
    first.save_checkpoint(checkpoint)
    resumed_monitor = monitor()
    part2 = SpyLogger()
    trainer = pl.Trainer(max_steps=8, logger=part2, callbacks=[resumed_monitor], **trainer_kwargs())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model(), loader(), ckpt_path=checkpoint)
    assert part1.steps_with("fisher/block/kl/all") == [0, 3]
    assert part2.steps_with("fisher/block/kl/all") == [6]
    assert part2.value("fisher/block/kl/all", 6) == full.value("fisher/block/kl/all", 6)
    assert [step for step, _ in resumed_monitor.state_dict()["history"]] == [0, 3, 6]
    fresh = monitor()  # without the restored state the labels differ
    fresh_logger = SpyLogger()
    trainer = pl.Trainer(max_steps=8, logger=fresh_logger, callbacks=[fresh], **trainer_kwargs())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh.load_state_dict = lambda state: None
        trainer.fit(model(), loader(), ckpt_path=checkpoint)
    assert fresh_logger.value("fisher/block/kl/all", 6) != full.value("fisher/block/kl/all", 6)


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
            if "fisher/block/direction_cosine/all" in metrics:
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
    assert logger.value("fisher/probe/batch_size", 0) == 10
    # a fixed probe and unchanged weights: the same numbers at every step
    values = [logger.value("fisher/diag/kl/all", s) for s in range(3)]
    assert values[0] == values[1] == values[2]

    dataloader_probe = FisherMonitor(
        every_n_steps=1,
        structures=("diag",),
        network="net",
        probe_data=loader(batch_size=8, shuffle=True),
    )
    _, _, logger = fit(dataloader_probe, steps=2, model=TinyClassifier(lr=0.0))
    assert logger.value("fisher/probe/batch_size", 1) == 8


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
    assert logger.steps_with("fisher/diag/kl/all") == [0, 1]
    splitter = FisherMonitor(
        every_n_steps=1,
        structures=("diag",),
        batch_to_inputs_targets=lambda b: (b["image"], b["label"]),
    )
    _, _, logger = fit(splitter, steps=1, model=DictClassifier(), data=data)
    assert logger.steps_with("fisher/diag/kl/all") == [0]


def test_gradient_accumulation_measures_once_per_optimizer_step():
    _, _, logger = fit(
        FisherMonitor(every_n_steps=1, structures=("diag",)), steps=3, accumulate_grad_batches=2
    )
    assert logger.steps_with("fisher/diag/kl/all") == [0, 1, 2]


def test_prog_bar_and_log_spaced_schedule():
    monitor = FisherMonitor(
        schedule=schedules.log_spaced(per_decade=4),
        structures=("diag",),
        prog_bar="diag/direction_cosine/all",
    )
    trainer, _, logger = fit(monitor, steps=12)
    assert logger.steps_with("fisher/diag/kl/all") == [0, 1, 2, 4, 6, 10]
    assert "fisher/diag/direction_cosine/all" in trainer.progress_bar_metrics


# ---------------------------------------------------------------- errors


def test_no_logger_is_an_error_at_setup():
    trainer = pl.Trainer(max_steps=1, logger=False, callbacks=[FisherMonitor()], **trainer_kwargs())
    with pytest.raises(
        MisconfigurationException,
        match=r"Cannot use `FisherMonitor` callback with `Trainer\(logger=False\)`",
    ):
        trainer.fit(TinyClassifier(), loader())


def test_missing_and_ambiguous_losses_are_errors_at_setup():
    model = TinyClassifier()
    del model.loss_fn
    model.training_step = lambda batch, i: nn.functional.cross_entropy(model(batch[0]), batch[1])
    with pytest.raises(
        ValueError, match="found no loss module on TinyClassifier.*loss_fn=nn.CrossEntropyLoss"
    ):
        fit(FisherMonitor(), steps=1, model=model)
    model = TinyClassifier()
    model.other_loss = nn.MSELoss()
    with pytest.raises(
        ValueError, match=r"several losses on TinyClassifier \(\['loss_fn', 'other_loss'\]\)"
    ):
        fit(FisherMonitor(), steps=1, model=model)
    model = TinyClassifier()
    model.loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    with pytest.raises(ValueError, match="found the loss `loss_fn`.*label_smoothing"):
        fit(FisherMonitor(), steps=1, model=model)


def test_unsupported_network_is_an_error_at_setup():
    model = TinyClassifier()
    model.net[1] = nn.GELU()
    with pytest.raises(NotImplementedError, match=r"module\(s\) '1' \(GELU\)"):
        fit(FisherMonitor(network="net", backend="backpack"), steps=1, model=model)
    # by default the torch.func backend takes over, and says so
    monitor = FisherMonitor(network="net", every_n_steps=1, structures=("diag", "block"))
    _, _, logger = fit(monitor, steps=2, model=model)
    assert logger.steps_with("fisher/block/direction_cosine/all") == [0, 1]
    assert any("measured with torch.func" in note for note in monitor.last_measurement.notes)
    with pytest.raises(ValueError, match="has no attribute 'backbone'"):
        fit(FisherMonitor(network="backbone"), steps=1)


def test_module_without_forward_uses_the_submodule_holding_the_parameters():
    class NoForward(TinyClassifier):
        forward = pl.LightningModule.forward

        def training_step(self, batch, batch_idx):
            return self.loss_fn(self.net(batch[0]), batch[1])

    _, _, logger = fit(
        FisherMonitor(every_n_steps=1, structures=("diag",)), steps=2, model=NoForward()
    )
    assert "fisher/diag/kl/0" in logger.calls[0][1]  # layers named inside `net`

    class TwoParts(NoForward):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(3, 3)

    with pytest.raises(ValueError, match="defines no forward\\(\\) and no single submodule"):
        fit(FisherMonitor(), steps=1, model=TwoParts())


def test_untraceable_forward_is_named_at_setup():
    class Branchy(TinyClassifier):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.net(x)
            return self.net(-x)

    with pytest.raises(
        NotImplementedError, match="cannot trace the forward pass of Branchy with torch.fx"
    ):
        fit(FisherMonitor(backend="backpack"), steps=1, model=Branchy())
    # torch.func follows data-dependent control flow: "auto" measures it
    monitor = FisherMonitor(every_n_steps=1, structures=("diag",))
    _, _, logger = fit(monitor, steps=2, model=Branchy())
    assert logger.steps_with("fisher/diag/kl/all") == [0, 1]


def test_batch_that_cannot_be_split_is_an_error_at_the_first_batch():
    class OnlyInputs(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            return torch.randn(4)

    class Unsupervised(TinyClassifier):
        def training_step(self, batch, batch_idx):
            return self(batch).square().mean()

    data = torch.utils.data.DataLoader(OnlyInputs(), batch_size=8)
    with pytest.raises(
        ValueError, match="cannot split a batch of type Tensor.*batch_to_inputs_targets"
    ):
        fit(FisherMonitor(every_n_steps=100), steps=3, model=Unsupervised(), data=data)


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
    ):
        _, _, logger = fit(
            FisherMonitor(every_n_steps=1, structures=("diag",)), steps=4, model=Robust(), data=data
        )
    assert logger.steps_with("fisher/diag/kl/all") == [0, 3]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="either `every_n_steps` or `schedule`"):
        FisherMonitor(every_n_steps=3, schedule=schedules.every(3))
    with pytest.raises(ValueError, match="Invalid probe_size: 0"):
        FisherMonitor(probe_size=0)
    with pytest.raises(ValueError, match="Invalid structure: 'full'"):
        FisherMonitor(structures=("full",))
    with pytest.raises(ValueError, match="Unsupported loss 'L1Loss'"):
        FisherMonitor(loss_fn=nn.L1Loss())
