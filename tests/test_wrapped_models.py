"""Models from ordinary practice that wrap their layers: compiled submodules, parametrized
weights, scalar parameters, and binary classifiers that squeeze their logit to ``(N,)``.

Each is measured (not merely survived), with the numbers of the float64 reference.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import reference
from fisher_monitor import measure

RTOL, ATOL = 1e-7, 1e-10


def base() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


class Holder(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def batch(n: int = 12, binary: bool = False):
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    if binary:
        return inputs, torch.randint(0, 2, (n,), generator=generator).to(torch.float64)
    return inputs, torch.randint(0, 3, (n,), generator=generator)


def assert_reference(result, model, loss, inputs, targets):
    expected = reference.diag_and_block_metrics(model, loss, inputs, targets)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=RTOL, abs=ATOL), key


@pytest.mark.parametrize("backend", ["auto", "backpack", "functorch"])
def test_compiled_submodule_is_measured_through_its_original_module(backend):
    plain = Holder(base())
    compiled = Holder(torch.compile(copy.deepcopy(plain.net)))
    inputs, targets = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = measure(compiled, nn.CrossEntropyLoss(), inputs, targets, backend=backend)
    assert result.layer_names == ["net.0", "net.2"]  # no "_orig_mod" in the names
    assert result.layers[0].parameter_names == ("net.0.weight", "net.0.bias")
    assert_reference(result, plain, nn.CrossEntropyLoss(), inputs, targets)
    same = measure(plain, nn.CrossEntropyLoss(), inputs, targets, backend=backend)
    for key, value in same.scalars.items():
        if key != "probe/seconds":
            assert result[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


def test_compiled_network_itself():
    model = base()
    inputs, targets = batch()
    result = measure(torch.compile(model), nn.CrossEntropyLoss(), inputs, targets)
    assert result.layer_names == ["0", "2"]
    assert_reference(result, model, nn.CrossEntropyLoss(), inputs, targets)


@pytest.mark.parametrize(
    "parametrize",
    [parametrizations.weight_norm, parametrizations.spectral_norm, parametrizations.orthogonal],
)
def test_parametrized_weights_are_measured_on_the_trained_parameters(parametrize):
    model = base()
    parametrize(model[0])
    model.eval()  # spectral_norm's power iteration would move its buffers on every forward
    inputs, targets = batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = measure(model, nn.CrossEntropyLoss(), inputs, targets)
    (layer, _) = result.layers
    assert layer.name == "0" and layer.module_type == "Linear"
    assert all(name.startswith("0.") for name in layer.parameter_names)
    assert any("parametrizations" in name for name in layer.parameter_names)
    assert any("torch.func" in note for note in result.notes)
    assert_reference(result, model, nn.CrossEntropyLoss(), inputs, targets)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # the model is left untouched


class Temperature(nn.Module):
    """CLIP-style: logits scaled by a learned 0-d ``logit_scale``."""

    def __init__(self):
        super().__init__()
        self.net = base()
        self.logit_scale = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, x):
        return self.net(x) * self.logit_scale.exp()


def test_scalar_parameter_is_a_layer_of_dimension_one():
    model = Temperature()
    inputs, targets = batch()
    result = measure(model, nn.CrossEntropyLoss(), inputs, targets, backend="functorch")
    assert result.layer_names == ["(root)", "net.0", "net.2"]
    assert result["block/dimension/(root)"] == 1.0
    assert_reference(result, model, nn.CrossEntropyLoss(), inputs, targets)
    auto = measure(model, nn.CrossEntropyLoss(), inputs, targets)
    assert auto["block/direction_cosine/all"] == pytest.approx(
        result["block/direction_cosine/all"], rel=1e-12
    )


class Squeezed(nn.Module):
    """A binary classifier returning one logit per sample as ``(N,)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()

    def forward(self, x):
        return self.net(x).squeeze(-1)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bce_with_one_logit_per_sample_as_a_vector(reduction):
    loss = nn.BCEWithLogitsLoss(reduction=reduction)
    inputs, targets = batch(binary=True)
    model = Squeezed()
    result = measure(model, loss, inputs, targets)
    assert_reference(result, model, loss, inputs, targets)
    flat = nn.Sequential(*model.net, nn.Flatten(0))  # the same (N,) logits, BackPACK-traceable
    on_backpack = measure(flat, loss, inputs, targets, backend="backpack")
    for key, value in result.scalars.items():
        if key.startswith(("diag/", "block/")) and key.endswith("/all"):
            assert on_backpack[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    column = measure(model.net, loss, inputs, targets.unsqueeze(1))  # (N, 1) as before
    assert column["block/kl/all"] == pytest.approx(result["block/kl/all"], rel=1e-9)


class ScaledInside(nn.Module):
    """A module owning a 0-d parameter (``x / t``) inside a BackPACK-supported network."""

    def __init__(self):
        super().__init__()
        self.t = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, x):
        return x / self.t


def test_scalar_parameter_inside_a_backpack_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), ScaledInside(), nn.Linear(6, 3)).double()
    inputs, targets = batch()
    result = measure(model, nn.CrossEntropyLoss(), inputs, targets)
    assert "2" in result.layer_names and result["block/dimension/2"] == 1.0
    assert_reference(result, model, nn.CrossEntropyLoss(), inputs, targets)
