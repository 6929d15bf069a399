"""measure() leaves the caller's model exactly as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from backpack.context import CTX
from torch import nn

from fisher_monitor import measure


def hook_counts(model: nn.Module) -> list[int]:
    counts = []
    for module in model.modules():
        for key, value in vars(module).items():
            if "hooks" in key and isinstance(value, dict):
                counts.append(len(value))
    return counts


def model_with_state():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(3 * 4 * 4, 3),
    )
    inputs = torch.randn(8, 1, 6, 6)
    targets = torch.randint(0, 3, (8,))
    return model, inputs, targets


@pytest.mark.parametrize("fisher", ["exact", "mc"])
@pytest.mark.parametrize("train_mode", [True, False])
def test_model_is_untouched(fisher, train_mode):
    model, inputs, targets = model_with_state()
    model.train(train_mode)
    model[5].weight.grad = torch.full_like(model[5].weight, 0.5)  # an existing gradient stays
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    param_ids = {n: id(p) for n, p in model.named_parameters()}
    buffers_before = {n: b.clone() for n, b in model.named_buffers()}
    modes_before = [m.training for m in model.modules()]
    hooks_before = hook_counts(model)
    handles_before = len(CTX.hook_handles)
    rng_before = torch.get_rng_state()
    attributes_before = [set(vars(m)) for m in model.modules()]
    param_attributes_before = {n: set(vars(p)) for n, p in model.named_parameters()}

    m = measure(
        model,
        nn.CrossEntropyLoss(),
        inputs,
        targets,
        structures=("diag", "block", "kron"),
        fisher=fisher,
        generator=torch.Generator().manual_seed(1),
    )

    assert m["block/dimension/all"] > 0
    for name, p in model.named_parameters():
        assert id(p) == param_ids[name]
        assert torch.equal(p.detach(), params_before[name]), name
        if name == "5.weight":
            assert torch.equal(p.grad, torch.full_like(p, 0.5))
        else:
            assert p.grad is None, name
        assert set(vars(p)) == param_attributes_before[name]
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers_before[name]), name  # BatchNorm running stats untouched
    assert [m.training for m in model.modules()] == modes_before
    assert hook_counts(model) == hooks_before
    assert len(CTX.hook_handles) == handles_before
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert [set(vars(m)) for m in model.modules()] == attributes_before
    if train_mode:
        assert any("BatchNorm in train mode" in note for note in m.notes)


def test_results_do_not_depend_on_global_rng_and_do_not_consume_it():
    model, inputs, targets = model_with_state()
    model.train()
    torch.manual_seed(42)
    first = measure(
        model,
        nn.CrossEntropyLoss(),
        inputs,
        targets,
        fisher="mc",
        generator=torch.Generator().manual_seed(5),
    )
    after_first = torch.rand(3)
    torch.manual_seed(42)
    torch.rand(100)  # a different global state
    second = measure(
        model,
        nn.CrossEntropyLoss(),
        inputs,
        targets,
        fisher="mc",
        generator=torch.Generator().manual_seed(5),
    )
    assert first["block/kl/all"] == second["block/kl/all"]  # dropout and labels: own seed
    torch.manual_seed(42)
    measure(model, nn.CrossEntropyLoss(), inputs, targets)
    assert torch.equal(torch.rand(3), after_first)


def test_training_after_measurement_is_bit_identical():
    """Same weights after a few SGD steps with and without measurements in between."""

    def train(with_measurements: bool):
        model, inputs, targets = model_with_state()
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(7)
        for _ in range(3):
            if with_measurements:
                measure(model, nn.CrossEntropyLoss(), inputs, targets, fisher="mc")
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
        return copy.deepcopy(model.state_dict())

    plain, measured = train(False), train(True)
    for key in plain:
        assert torch.equal(plain[key], measured[key]), key


def test_user_hooks_are_not_called_by_the_measurement():
    model, inputs, targets = model_with_state()
    calls = []
    handle = model[5].register_forward_hook(lambda *args: calls.append(1))
    measure(model, nn.CrossEntropyLoss(), inputs, targets)
    assert calls == []
    model(inputs)
    assert calls == [1]
    handle.remove()
