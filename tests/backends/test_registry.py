"""The backend registry: choice, structured refusals, and falling back when BackPACK fails."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fisher_monitor import measure
from fisher_monitor.backends import (
    BACKENDS,
    UnsupportedNetworkError,
    check_backend,
    prepare,
)
from fisher_monitor.likelihoods import Categorical


def pooled_double_network():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 3)
    ).double()


def test_backpack_dtype_failure_falls_back_to_the_next_backend():
    """A float64 network with AvgPool2d under float32 default dtype: BackPACK's pooling
    Jacobian fails ("expected scalar type Double but found Float"); auto measures with
    the autograd backend instead, says why, and gets the torch.func backend's numbers."""
    assert torch.get_default_dtype() == torch.float32
    model = pooled_double_network()
    inputs = torch.randn(6, 1, 6, 6, dtype=torch.float64)
    targets = torch.randint(0, 3, (6,))
    auto = measure(model, nn.CrossEntropyLoss(), inputs, targets)
    assert any(
        note.startswith("BackPACK failed on this network") and "autograd" in note
        for note in auto.notes
    )
    assert {entry["backend"] for entry in auto.coverage} == {"autograd"}
    forced = measure(model, nn.CrossEntropyLoss(), inputs, targets, backend="functorch")
    for key, value in forced.scalars.items():
        if key != "probe/seconds":
            assert auto[key] == pytest.approx(value, rel=1e-10, abs=1e-13), key
    with pytest.raises(RuntimeError, match="BackPACK failed on this network.*backend='auto'"):
        measure(model, nn.CrossEntropyLoss(), inputs, targets, backend="backpack")


def test_unsupported_network_error_lists_the_modules():
    model = nn.Sequential(nn.Linear(3, 4), nn.RReLU(), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(UnsupportedNetworkError) as caught:
        prepare(model, Categorical("mean"), "backpack")
    error = caught.value
    assert error.backend == "backpack"
    assert error.modules == ["'1' (RReLU)"]
    assert "Supported module types:" in str(error) and "Linear" in error.fix
    assert isinstance(error, NotImplementedError)  # what callers caught before
    network = prepare(model, Categorical("mean"), "auto")
    assert network.backend == "autograd"
    assert network.preparation_notes[0].startswith("BackPACK cannot handle module(s) '1' (RReLU)")
    network.close()


def test_backend_names_are_validated():
    assert BACKENDS == ("auto", "backpack", "autograd", "functorch")
    assert check_backend("functorch") == "functorch"
    with pytest.raises(ValueError, match=r"Invalid backend: 'jax'. Supported: \('auto'"):
        check_backend("jax")


class Untraceable(nn.Module):
    """``torch.relu`` on a value torch.fx cannot follow: BackPACK's converter refuses it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)[:, : int(x.shape[1]) - 1]


def test_auto_remembers_a_backend_that_refused_the_network(monkeypatch):
    """A second one-shot ``measure()`` of the same network does not prepare BackPACK again
    (its note stays); a changed module tree, or another network, is tried afresh."""
    from fisher_monitor.backends import registry

    attempts = []
    original = registry.REGISTRY["backpack"]

    def counted(*args, **kwargs):
        attempts.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setitem(registry.REGISTRY, "backpack", counted)
    torch.manual_seed(0)
    model = Untraceable()
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    first = measure(model, nn.CrossEntropyLoss(), x, y, structures="diag")
    second = measure(model, nn.CrossEntropyLoss(), x, y, structures="diag")
    assert len(attempts) == 1
    assert {e["backend"] for e in first.coverage} == {e["backend"] for e in second.coverage}
    assert {e["backend"] for e in second.coverage} == {"autograd"}
    refusal = [note for note in first.notes if note.startswith("BackPACK")]
    assert refusal and refusal == [note for note in second.notes if note.startswith("BackPACK")]
    timeless = [{k: v for k, v in m.scalars.items() if "seconds" not in k} for m in (first, second)]
    assert timeless[0] == timeless[1]
    model.extra = nn.Identity()  # a new module: the tree changed
    measure(model, nn.CrossEntropyLoss(), x, y, structures="diag")
    measure(Untraceable(), nn.CrossEntropyLoss(), x, y, structures="diag")
    assert len(attempts) == 3
