"""Odd models, odd batches and faults: the monitor keeps working, says what it did, never breaks training."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

import lightning_helpers as helpers
import reference
from fisher_monitor import FisherMonitor, Measurer, measure
from fisher_monitor.settings import MeasureSettings
from lightning_helpers import MappedDataset, TinyClassifier, loader, trainer_kwargs
from reference_checks import assert_matches


def fit(monitor, model=None, data=None, steps=4, **kwargs):
    trainer, _, logger = helpers.fit(monitor, steps=steps, model=model, data=data, **kwargs)
    return trainer, logger


# ---------------------------------------------------------------- models


def test_inplace_activations_are_measured_out_of_place():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6),
        nn.ReLU(inplace=True),
        nn.Linear(6, 3),
        nn.LeakyReLU(inplace=True),
        nn.Linear(3, 2),
    ).double()
    inputs, targets = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 2, (7,))
    m = measure(model, nn.CrossEntropyLoss(), inputs, targets, backend="backpack")
    assert_matches(
        m.scalars, reference.diag_and_block_metrics(model, nn.CrossEntropyLoss(), inputs, targets)
    )
    assert model[1].inplace and model[3].inplace


def test_integer_inputs_through_an_embedding_with_backpack():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # BackPACK's Embedding Jacobian uses the default dtype
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(10, 3), nn.Flatten(), nn.Linear(12, 2))
        tokens, targets = torch.randint(0, 10, (6, 4)), torch.randint(0, 2, (6,))
        m = measure(model, nn.CrossEntropyLoss(), tokens, targets)
        assert {entry["backend"] for entry in m.coverage} == {"backpack"}
        assert_matches(
            m.scalars,
            reference.diag_and_block_metrics(model, nn.CrossEntropyLoss(), tokens, targets),
        )
    finally:
        torch.set_default_dtype(previous)


def test_bfloat16_parameters_are_measured_through_float32_copies():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.bfloat16)
    inputs, targets = torch.randn(9, 5), torch.randint(0, 3, (9,))
    m = measure(model, nn.CrossEntropyLoss(), inputs.to(torch.bfloat16), targets)
    assert any("parameters in bfloat16 measured through float32 copies" in n for n in m.notes)
    # the same (bf16-rounded) weights in float32 give the same numbers
    twin = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    twin.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    expected = measure(twin, nn.CrossEntropyLoss(), inputs.to(torch.bfloat16).float(), targets)
    for key, value in expected.scalars.items():
        if key != "probe/seconds":
            assert m[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert next(model.parameters()).dtype == torch.bfloat16


def test_autocast_is_switched_off_and_noted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    inputs, targets = torch.randn(9, 5), torch.randint(0, 3, (9,))
    plain = measure(model, nn.CrossEntropyLoss(), inputs, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = measure(model, nn.CrossEntropyLoss(), inputs, targets)
    assert any("autocast" in note for note in under_autocast.notes)
    assert under_autocast["block/kl/all"] == pytest.approx(plain["block/kl/all"], rel=1e-9)


def test_float64_batch_for_a_float32_model_is_cast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    inputs, targets = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    cast = measure(model, nn.CrossEntropyLoss(), inputs, targets)
    same = measure(model, nn.CrossEntropyLoss(), inputs.float(), targets)
    assert cast["block/kl/all"] == same["block/kl/all"]


def test_lightning_bf16_mixed_precision_run():
    monitor = FisherMonitor(every_n_steps=1, structures=("diag", "block"))
    _, logger = fit(monitor, steps=3, precision="bf16-mixed")
    assert logger.steps_with("~fisher/block/direction_cosine/all") == [0, 1, 2]


def test_multiple_optimizers_with_manual_optimization():
    """global_step counts every optimizer step: the monitor measures the whole network once
    at each scheduled step, whichever optimizer stepped."""

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
                torch.optim.SGD(self.net[0].parameters(), lr=0.1),
                torch.optim.SGD(self.net[3].parameters(), lr=0.1),
            )

    _, logger = fit(
        FisherMonitor(every_n_steps=2, structures=("diag",)), model=TwoOptimizers(), steps=8
    )
    steps = logger.steps_with("~fisher/diag/kl/all")
    assert steps == sorted(set(steps)) and all(s % 2 == 0 for s in steps) and len(steps) >= 2
    assert (
        "~fisher/diag/kl/net.0" in logger.calls[0][1]
        and "~fisher/diag/kl/net.3" in logger.calls[0][1]
    )


# ---------------------------------------------------------------- faults


def test_non_finite_gradients_with_a_finite_loss_name_the_layer():
    class Kink(nn.Module):
        def forward(self, x):
            return torch.sqrt(torch.abs(x))  # finite at 0, infinite slope there

    model = nn.Sequential(nn.Linear(3, 4), Kink(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    inputs, targets = torch.randn(5, 3), torch.randint(0, 2, (5,))
    with pytest.raises(FloatingPointError, match="Non-finite gradients or curvature in layer '0'"):
        measure(model, nn.CrossEntropyLoss(), inputs, targets)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_batch_is_skipped_with_one_warning(poison):
    poisoned = MappedDataset(lambda i, x, y: ((x.clone().fill_(poison) if i in (20, 40) else x), y))

    class Robust(TinyClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.loss_fn(self(torch.nan_to_num(x, posinf=0.0)), y)

    data = torch.utils.data.DataLoader(poisoned, batch_size=16)
    with pytest.warns(
        UserWarning, match=r"skipped the measurement at step 1 \(FloatingPointError"
    ) as caught:
        _, logger = fit(
            FisherMonitor(every_n_steps=1, structures=("diag",)), model=Robust(), data=data
        )
    assert len([w for w in caught if "skipped the measurement" in str(w.message)]) == 1  # once
    assert logger.steps_with("~fisher/diag/kl/all") == [0, 3]


def test_probe_that_would_not_fit_is_sub_sampled_and_noted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 10))
    inputs, targets = torch.randn(64, 10), torch.randint(0, 10, (64,))
    settings = MeasureSettings.create(("diag", "block"), "exact")
    measurer = Measurer(model, nn.CrossEntropyLoss(), settings)
    full = measurer.estimate_peak_bytes(inputs, 64)
    budget = measurer.estimate_peak_bytes(inputs, 20)
    assert full > budget
    m = measure(
        model, nn.CrossEntropyLoss(), inputs, targets, memory_budget=budget, estimator="exact"
    )
    assert m["probe/batch_size"] == 20
    assert any(
        "probe sub-sampled from 64 to 20 samples to fit the memory budget" in n for n in m.notes
    )
    with pytest.raises(MemoryError, match="Even one probe sample needs an estimated"):
        measure(model, nn.CrossEntropyLoss(), inputs, targets, memory_budget=10)
    # with the default estimator="auto", a sketch of the Fisher is preferred to a smaller probe
    auto = measure(model, nn.CrossEntropyLoss(), inputs, targets, memory_budget=budget)
    assert auto.settings["estimator"]["method"] == "sketch" or auto["probe/batch_size"] == 64


def test_out_of_memory_is_retried_on_half_the_samples(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3))
    inputs, targets = torch.randn(16, 6), torch.randint(0, 3, (16,))
    from fisher_monitor.engine import measurer as measurer_module

    original = measurer_module.measure_once

    def pretend(prepared, settings, inputs, targets, *args, **kwargs):
        if targets.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(prepared, settings, inputs, targets, *args, **kwargs)

    monkeypatch.setattr(measurer_module, "measure_once", pretend)
    m = measure(model, nn.CrossEntropyLoss(), inputs, targets)
    assert m["probe/batch_size"] == 4
    assert [n for n in m.notes if "ran out of memory" in n] == [
        "ran out of memory with 16 samples; retried with 8",
        "ran out of memory with 8 samples; retried with 4",
    ]


def test_callback_survives_out_of_memory_and_bad_targets(monkeypatch):
    calls = []
    original = Measurer.__call__

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("simulated")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Measurer, "__call__", flaky)
    with pytest.warns(
        UserWarning, match=r"skipped the measurement at step 1 \(OutOfMemoryError: simulated\)"
    ):
        _, logger = fit(FisherMonitor(every_n_steps=1, structures=("diag",)), steps=3)
    assert logger.steps_with("~fisher/diag/kl/all") == [0, 2]
    monkeypatch.undo()

    bad_targets = FisherMonitor(
        every_n_steps=1,
        structures=("diag",),
        batch_to_inputs_targets=lambda b: (b[0], b[1].float()),
    )
    with pytest.warns(
        UserWarning, match=r"CrossEntropyLoss needs integer class indices.*targets \(16,\)"
    ):
        _, logger = fit(bad_targets, steps=2)
    assert logger.steps_with("~fisher/diag/kl/all") == []


def test_empty_probe_and_batch_of_one_in_the_callback():
    empty = FisherMonitor(
        every_n_steps=1,
        structures=("diag",),
        batch_to_inputs_targets=lambda b: (b[0][:0], b[1][:0]),
    )
    with pytest.warns(UserWarning, match=r"ValueError: The probe batch is empty"):
        _, logger = fit(empty, steps=2)
    assert logger.steps_with("~fisher/diag/kl/all") == []
    one = FisherMonitor(every_n_steps=1, structures=("diag", "block", "kron"), probe_size=1)
    _, logger = fit(one, steps=2)
    assert logger.value("~fisher/probe/batch_size", 0) == 1
    assert logger.value("~fisher/block/ef_projection_per_sample/all", 0) == pytest.approx(
        2.0, rel=1e-3
    )  # rank 1 per layer


def test_coverage_is_logged_as_text_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = TinyClassifier()
    model.net[1] = nn.RReLU()  # BackPACK cannot: the autograd backend measures
    monitor = FisherMonitor(every_n_steps=1, structures=("diag",))
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_steps=2,
        logger=pl.loggers.TensorBoardLogger(tmp_path),
        callbacks=[monitor],
        **trainer_kwargs(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader())
    events = EventAccumulator(
        str(tmp_path / "lightning_logs" / "version_0"), size_guidance={"tensors": 0}
    )
    events.Reload()
    texts = events.Tensors("~fisher/settings/text_summary")
    assert len(texts) == 1
    text = texts[0].tensor_proto.string_val[0].decode()
    assert "| net.0 | Linear | net.0.weight, net.0.bias | 40 | autograd | measured |" in text
    assert "measured with autograd with module hooks" in text


# ---------------------------------------------------------------- unusual networks


def test_pruned_weights_are_measured_through_the_parameters_the_optimizer_trains():
    """Pruning recomputes `weight` from `weight_orig` in a forward pre-hook: the BackPACK
    backend refuses, torch.func measures the trainable `weight_orig`, the caller's .grad stays."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    prune.l1_unstructured(model[0], "weight", amount=0.4)
    inputs, targets = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(NotImplementedError, match=r"reparametrised weights .* in '0' \(Linear\)"):
        measure(model, nn.CrossEntropyLoss(), inputs, targets, backend="backpack")
    m = measure(model, nn.CrossEntropyLoss(), inputs, targets)
    assert m.layers[0].parameter_names == ("0.bias", "0.weight_orig")
    assert model[0].weight_orig.grad is None
    # masked entries get exactly zero per-sample gradients, hence zero EF and F diagonals
    fisher_diag, ef_diag = m.diagonals["0"]
    mask = model[0].weight_mask.flatten().bool()
    assert torch.all(ef_diag[5:][~mask] == 0) and torch.all(fisher_diag[5:][~mask] == 0)
    assert_matches(
        m.scalars, reference.diag_and_block_metrics(model, nn.CrossEntropyLoss(), inputs, targets)
    )


def test_shared_buffer_zero_size_parameter_and_syncbatchnorm():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.device_tracker = nn.Parameter(torch.empty(0))  # a common idiom
            self.first, self.second = nn.Linear(3, 4), nn.Linear(4, 2)
            scale = torch.ones(1)
            self.first.register_buffer("scale", scale)
            self.second.register_buffer("scale", scale)  # one buffer, two modules
            self.norm = nn.SyncBatchNorm(4)

        def forward(self, x):
            return (
                self.second(torch.tanh(self.norm(self.first(x) * self.first.scale)))
                * self.second.scale
            )

    torch.manual_seed(0)
    model = Odd().train()  # SyncBatchNorm in train mode
    m = measure(model, nn.CrossEntropyLoss(), torch.randn(6, 3), torch.randint(0, 2, (6,)))
    assert [layer.name for layer in m.layers] == ["first", "second", "norm"]
    assert any(
        "BatchNorm in train mode measured in eval mode" in n and n.endswith(": norm")
        for n in m.notes
    )


def test_layer_named_all_and_outputs_that_are_not_one_tensor():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.all = nn.Linear(3, 2)

        def forward(self, x):
            return self.all(x)

    with pytest.raises(ValueError, match="named 'all'.*Rename"):
        measure(Bad(), nn.CrossEntropyLoss(), torch.randn(4, 3), torch.randint(0, 2, (4,)))

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x), x

    # a tuple's first element is the loss's input, as for most models returning extras
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    model = Pair()
    pair = measure(model, nn.CrossEntropyLoss(), x, y, structures=("diag",))
    plain = measure(model.fc, nn.CrossEntropyLoss(), x, y, structures=("diag",))
    assert pair.coverage[0]["backend"] == "autograd"  # BackPACK cannot follow the selection
    assert pair["diag/trace_ratio/all"] == pytest.approx(plain["diag/trace_ratio/all"])

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return {"scores": self.fc(x)}

    named = Named()
    named.fc.load_state_dict(model.fc.state_dict())
    with pytest.raises(TypeError, match=r"one tensor.*got a dict.*outputs=lambda out"):
        measure(named, nn.CrossEntropyLoss(), x, y)
    picked = measure(
        named, nn.CrossEntropyLoss(), x, y, structures=("diag",), outputs=lambda o: o["scores"]
    )
    assert picked["diag/trace_ratio/all"] == pytest.approx(plain["diag/trace_ratio/all"])


def test_lazy_modules_and_configure_model_in_the_callback():
    class Lazy(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.LazyLinear(8), nn.Tanh(), nn.Linear(8, 3))

    with pytest.raises(ValueError, match="uninitialised lazy parameters"):
        measure(Lazy().net, nn.CrossEntropyLoss(), torch.randn(4, 4), torch.randint(0, 3, (4,)))
    # the first measured step is recorded to find the loss: its forward pass gives the lazy
    # modules their shapes before it is measured (tests/callback/test_failures.py has the
    # retry when everything is told and the first step is measured at its start)
    _, logger = fit(FisherMonitor(every_n_steps=1, structures=("diag",)), model=Lazy(), steps=3)
    assert logger.steps_with("~fisher/diag/kl/all") == [0, 1, 2]

    class Configured(TinyClassifier):
        def __init__(self):
            super().__init__()
            del self.net

        def configure_model(self):
            if not hasattr(self, "net"):
                self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    _, logger = fit(
        FisherMonitor(every_n_steps=1, structures=("diag",), network="net"),
        model=Configured(),
        steps=2,
    )
    assert logger.steps_with("~fisher/diag/kl/all") == [0, 1]


def test_distributed_diagonal_reduction_joins_batches_exactly():
    """Two processes simulated by adding their flat tensors: equal to one joined batch,
    for the diagonals, the gradient and the loss ("mean" averages, "sum" adds)."""
    from types import SimpleNamespace

    from fisher_monitor.engine.distributed_diagonals import reduce_diagonals

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    layers = [SimpleNamespace(name="0", dimension=16), SimpleNamespace(name="2", dimension=10)]
    for reduction in ("mean", "sum"):
        loss = nn.CrossEntropyLoss(reduction=reduction)
        kwargs = dict(structures=("diag",), keep_blocks=True)
        joined = measure(model, loss, x, y, **kwargs)
        flats = []

        def record(flat):
            flats.append(flat)
            return flat

        for part in (slice(0, 4), slice(4, 10)):
            m = measure(model, loss, x[part], y[part], **kwargs)
            local = {n: (*m.diagonals[n], m.blocks[n][2]) for n in ("0", "2")}
            reduce_diagonals(
                local, layers, m["probe/loss"], m["probe/batch_size"], record, reduction == "sum"
            )
        # a process where no gradient reached layer "2" still sends a tensor of the same size
        m = measure(model, loss, x[4:], y[4:], **kwargs)
        partial = {"0": (*m.diagonals["0"], m.blocks["0"][2])}
        reduce_diagonals(
            partial, layers, m["probe/loss"], m["probe/batch_size"], record, reduction == "sum"
        )
        assert flats[2].shape == flats[1].shape
        # the all-reduce: the sum of both processes' tensors
        total = flats[0] + flats[1]
        reduced, joined_loss, size = reduce_diagonals(
            {}, layers, 0.0, 0.0, lambda flat: total, reduction == "sum"
        )
        assert size == 10
        assert set(reduced) == {"0", "2"}  # measured on at least one process
        for name in ("0",):
            torch.testing.assert_close(
                reduced[name][0], joined.diagonals[name][0], rtol=1e-10, atol=1e-14
            )
            torch.testing.assert_close(
                reduced[name][1], joined.diagonals[name][1], rtol=1e-10, atol=1e-14
            )
            torch.testing.assert_close(
                reduced[name][2], joined.blocks[name][2], rtol=1e-10, atol=1e-14
            )
        assert joined_loss == pytest.approx(
            sum(
                float(loss(model(x[p]), y[p]).detach())
                * (1 if reduction == "sum" else len(y[p]) / 10)
                for p in (slice(0, 4), slice(4, 10))
            ),
            rel=1e-10,
        )


def test_measure_accepts_memory_budget_sizes_and_rejects_nonsense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    inputs, targets = torch.randn(8, 4), torch.randint(0, 3, (8,))
    m = measure(model, nn.CrossEntropyLoss(), inputs, targets, memory_budget="1GB")
    assert m["probe/batch_size"] == 8
    with pytest.raises(ValueError, match="Invalid memory_budget: '1 gigabyte'"):
        measure(model, nn.CrossEntropyLoss(), inputs, targets, memory_budget="1 gigabyte")


@pytest.mark.parametrize(("width", "samples"), [(64, 40), (300, 64)])
def test_a_layer_no_gradient_reaches_gets_no_rounding_note(width, samples):
    """Behind a zero weight (timm's zero-initialised last normalisation of a block), a layer's
    F and EF are exactly zero: its rounding estimate, relative to zero statistics, came out
    as 3e+01 (probed, R = 360) and 7e+297 (model, R = 576) and named it in a note. It has no
    curvature to blur: no note, and the other layers keep their metrics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, width), nn.Tanh(), nn.Linear(width, 10))
    with torch.no_grad():
        model[2].weight.zero_()
    x, y = torch.randn(samples, 20), torch.randint(0, 10, (samples,))
    m = measure(model, nn.CrossEntropyLoss(), x, y)
    assert m.scalars["block/trace_ratio/0"] != m.scalars["block/trace_ratio/0"]  # 0/0: nan
    assert not [note for note in m.notes if "may be off" in note], m.notes
    assert 0.0 < m.scalars["block/direction_cosine/2"] <= 1.0
