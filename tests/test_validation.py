"""Misuse gets a clear error that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fisher_monitor import measure
from fisher_monitor.likelihoods import UnsupportedLossError


@pytest.fixture
def batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    return model, torch.randn(5, 3), torch.randint(0, 2, (5,))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(structures=()), ValueError, r"Invalid structures: \(\)"),
        (
            dict(structures=("diag", "full")),
            ValueError,
            # (structures registered by other tests, e.g. the docs' example, may follow)
            r"Invalid structure: 'full'. Supported: \('diag', 'block', 'kron'[,)]",
        ),
        (dict(structures=("diag", "diag")), ValueError, "twice"),
        (
            dict(fisher="empirical"),
            ValueError,
            r"Invalid fisher: 'empirical'. Supported: \('exact', 'mc'\)",
        ),
        (dict(mc_samples=0), ValueError, "Invalid mc_samples: 0"),
        (dict(mc_samples=1.5), ValueError, "Invalid mc_samples: 1.5"),
        (dict(damping=0.0), ValueError, "Invalid damping: 0.0"),
        (dict(damping=-1e-3), ValueError, "Invalid damping: -0.001"),
        (dict(damping=float("nan")), ValueError, "Invalid damping: nan"),
        (dict(damping=[]), ValueError, r"Invalid damping: \[\]"),
        (dict(damping=[1e-3, 1e-3]), ValueError, "repeats a value"),
        (dict(damping="small"), TypeError, "Invalid damping: .small. is a string"),
        (
            dict(damping_mode="trace"),
            ValueError,
            r"Invalid damping_mode: 'trace'. Supported: \('relative', 'absolute'\)",
        ),
    ],
)
def test_invalid_settings(batch, kwargs, error, match):
    model, inputs, targets = batch
    with pytest.raises(error, match=match):
        measure(model, nn.CrossEntropyLoss(), inputs, targets, **kwargs)


@pytest.mark.parametrize(
    "loss_fn, match",
    [
        (nn.L1Loss(), r"Unsupported loss 'L1Loss'.*Supported: \('CrossEntropyLoss', 'MSELoss'"),
        (nn.CrossEntropyLoss(label_smoothing=0.1), "label_smoothing=0.1"),
        (nn.CrossEntropyLoss(weight=torch.ones(2)), "class `weight`"),
        (nn.NLLLoss(weight=torch.ones(2)), "NLLLoss with class `weight`"),
        (nn.CrossEntropyLoss(reduction="none"), "reduction='none'"),
        (nn.BCEWithLogitsLoss(pos_weight=torch.ones(1)), "pos_weight"),
        (
            "hinge",
            r"Unknown loss name 'hinge'. Supported: \('cross_entropy', 'mse', 'bce_with_logits', "
            r"'nll'[,)]",
        ),
    ],
)
def test_unsupported_losses(batch, loss_fn, match):
    model, inputs, targets = batch
    with pytest.raises(UnsupportedLossError, match=match):
        measure(model, loss_fn, inputs, targets)


def test_loss_names_are_accepted(batch):
    model, inputs, targets = batch
    m = measure(model, "cross_entropy", inputs, targets)
    assert m.settings["structures"] == ["diag", "block"]


@pytest.mark.parametrize(
    "loss_fn, outputs, targets, match",
    [
        (nn.CrossEntropyLoss(), 2, torch.rand(5, 2), "integer class indices"),
        (nn.CrossEntropyLoss(), 2, torch.randint(0, 2, (5, 1)), r"targets of shape \(N, ...\)"),
        (
            nn.CrossEntropyLoss(),
            2,
            torch.tensor([0, 1, 2, 0, 1]),
            r"class indices in \[0, 2\) or ignore_index \(-100\), found 2",
        ),
        (nn.CrossEntropyLoss(ignore_index=0), 2, torch.tensor([0, 1, -100, 0, 1]), "ignore_index"),
        (nn.MSELoss(), 1, torch.randn(5), r"targets \(5,\).*Reshape the targets to \(5, 1\)"),
        (nn.MSELoss(), 2, torch.randint(0, 2, (5, 2)), "floating-point targets"),
        (nn.BCEWithLogitsLoss(), 1, torch.rand(5, 1), "binary"),
        (nn.BCEWithLogitsLoss(), 1, torch.randint(0, 2, (5,)).float(), "unsqueeze"),
        (nn.BCEWithLogitsLoss(), 2, torch.randint(0, 2, (5, 2)).float(), "single logit"),
    ],
)
def test_targets_that_do_not_fit_the_loss(loss_fn, outputs, targets, match):
    model = nn.Linear(3, outputs)
    with pytest.raises(ValueError, match=match):
        measure(model, loss_fn, torch.randn(5, 3), targets)


def test_batch_problems(batch):
    model, inputs, targets = batch
    with pytest.raises(ValueError, match="empty"):
        measure(model, nn.CrossEntropyLoss(), inputs[:0], targets[:0])
    with pytest.raises(ValueError, match="disagree on the batch size"):
        measure(model, nn.CrossEntropyLoss(), inputs[:4], targets)
    with pytest.raises(TypeError, match="targets must be a tensor"):
        measure(model, nn.CrossEntropyLoss(), inputs, [0, 1, 0, 1, 1])
    with pytest.raises(FloatingPointError, match="probe loss is nan"):
        measure(model, nn.CrossEntropyLoss(), torch.full_like(inputs, float("nan")), targets)


def test_unsupported_module_is_named(batch):
    _, inputs, targets = batch
    model = nn.Sequential(nn.Linear(3, 4), nn.RReLU(), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(
        NotImplementedError,
        match=r"'1' \(RReLU\).*Supported module types: .*Linear",
    ):
        measure(model, nn.CrossEntropyLoss(), inputs, targets, backend="backpack")
    m = measure(model, nn.CrossEntropyLoss(), inputs, targets)  # "auto": the next backend
    assert any(
        "cannot handle module(s) '1' (RReLU)" in note and "autograd" in note for note in m.notes
    )
    assert {entry["backend"] for entry in m.coverage} == {"autograd"}


def test_functional_call_the_converter_cannot_follow_is_named(batch):
    _, inputs, targets = batch

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc2(torch.nn.functional.gelu(self.fc1(x)))

    with pytest.raises(
        NotImplementedError,
        match=r"Net: it contains an operation that is not a module.*gelu.*nn.ReLU",
    ):
        measure(Net(), nn.CrossEntropyLoss(), inputs, targets, backend="backpack")


def test_tied_weights_are_one_layer_measured_by_the_autograd_backend(batch):
    _, inputs, targets = batch
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second, nn.Linear(3, 2))
    m = measure(model, nn.CrossEntropyLoss(), inputs, targets)
    assert [info.name for info in m.layers] == ["0", "2", "3"]
    assert m.layers[0].parameter_names == ("0.weight", "0.bias")
    assert m.layers[0].shared_with == ("2",) and m.layers[1].parameter_names == ("2.bias",)
    assert {entry["backend"] for entry in m.coverage} == {"autograd"}
    assert any("BackPACK" in note and "tied weights" in note for note in m.notes)


def test_network_without_trainable_parameters(batch):
    _, inputs, targets = batch
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        measure(model, nn.CrossEntropyLoss(), inputs, targets)


def test_model_must_be_a_module(batch):
    _, inputs, targets = batch
    with pytest.raises(TypeError, match="torch.nn.Module"):
        measure(lambda x: x, nn.CrossEntropyLoss(), inputs, targets)
