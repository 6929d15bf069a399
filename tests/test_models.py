"""Layer types and network shapes BackPACK supports, each against the dense reference."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from fisher_monitor import measure
from reference_checks import assert_matches, reference_for


class Residual(nn.Module):
    """Functional calls the BackPACK converter handles: flatten, add, scalar multiply."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 4), act=nn.Tanh()))
        self.block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.encoder(x.flatten(1))
        h = h + self.block(h)
        return self.head(0.5 * h)


def case(name):
    torch.manual_seed(0)
    if name == "nested_named":
        model = nn.Sequential(
            OrderedDict(
                encoder=nn.Sequential(OrderedDict(fc1=nn.Linear(4, 5), act=nn.Sigmoid())),
                head=nn.Sequential(OrderedDict(drop=nn.Dropout(0.0), out=nn.Linear(5, 3))),
            )
        )
        return model, (4,), ["encoder.fc1", "head.out"]
    if name == "residual_converter":
        return Residual(), (2, 2), ["encoder.fc1", "block.0", "head"]
    if name == "conv1d_elu":
        model = nn.Sequential(
            nn.Conv1d(2, 3, 3, stride=1, padding=1), nn.ELU(), nn.Flatten(), nn.Linear(18, 3)
        )
        return model, (2, 6), ["0", "3"]
    if name == "conv2d_maxpool_strided":
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3, stride=2, padding=1),
            nn.LeakyReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8, 3),
        )
        return model, (1, 8, 8), ["0", "4"]
    if name == "conv3d_dilated":
        model = nn.Sequential(
            nn.Conv3d(1, 2, 2, dilation=(1, 2, 1), padding=(1, 0, 0)),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(2 * 5 * 2 * 3, 3),
        )
        return model, (1, 4, 4, 4), ["0", "3"]
    raise KeyError(name)


@pytest.mark.parametrize(
    "name", ["nested_named", "residual_converter", "conv1d_elu", "conv2d_maxpool_strided"]
)
def test_supported_networks_match_reference(name):
    model, shape, layers = case(name)
    model = model.double()
    inputs = torch.randn(6, *shape, dtype=torch.float64)
    targets = torch.randint(0, 3, (6,))
    loss = nn.CrossEntropyLoss()
    m = measure(model, loss, inputs, targets, structures=("diag", "block", "kron"))
    assert m.layer_names == layers
    assert_matches(m.scalars, reference_for(model, loss, inputs, targets, [1e-3], "relative"))
    if name == "residual_converter":
        assert any("converter" in note for note in m.notes)


def test_batchnorm_eval_and_avgpool_without_kronecker_factors():
    """BatchNorm (eval) has per-sample gradients but no Kronecker factors: kron skips it."""
    import reference

    previous = torch.get_default_dtype()
    torch.set_default_dtype(
        torch.float64
    )  # BackPACK's AvgPool Jacobian builds default-dtype kernels
    try:
        torch.manual_seed(1)
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1),
            nn.BatchNorm2d(2),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(18, 3),
        )
        with torch.no_grad():
            model[1].running_mean.uniform_(-0.5, 0.5)
            model[1].running_var.uniform_(0.5, 2.0)
        model.eval()
        inputs = torch.randn(6, 1, 6, 6)
        targets = torch.randint(0, 3, (6,))
        loss = nn.CrossEntropyLoss()
        m = measure(model, loss, inputs, targets, structures=("diag", "block", "kron"))
        assert_matches(m.scalars, reference.diag_and_block_metrics(model, loss, inputs, targets))
        assert "kron/trace_ratio/1" not in m.scalars
        assert "kron/trace_ratio/0" in m.scalars and "kron/trace_ratio/all" in m.scalars
        assert any("no Kronecker factorisation for 1 (BatchNorm2d)" in note for note in m.notes)
    finally:
        torch.set_default_dtype(previous)


def test_unused_layer_is_reported():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    m = measure(Net(), nn.CrossEntropyLoss(), torch.randn(4, 3), torch.randint(0, 2, (4,)))
    assert m.layer_names == ["used"]
    assert any("not measured" in note and "unused" in note for note in m.notes)
