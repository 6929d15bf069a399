"""measure() against the brute-force reference: metric x structure x loss x reduction x model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import reference
from cases import LOSS_CASES, MODELS, make_problem
from fisher_monitor import measure
from fisher_monitor.factors import LayerFactors
from reference_checks import assert_matches, reference_for


@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_name", list(LOSS_CASES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_all_metrics_match_reference(model_name, loss_name, reduction, mode):
    model, inputs, targets, case = make_problem(model_name, loss_name)
    loss = case.module(reduction)
    damping = 1e-3 if mode == "relative" else 1e-2
    m = measure(
        model,
        loss,
        inputs,
        targets,
        structures=("diag", "block", "kron"),
        damping=damping,
        damping_mode=mode,
    )
    expected = reference_for(model, loss, inputs, targets, [damping], mode)
    assert_matches(m.scalars, expected)


def test_several_dampings_get_suffixed_keys():
    model, inputs, targets, case = make_problem("mlp", "ce")
    loss = case.module("mean")
    dampings = [1e-4, 1e-2, 1.0]
    m = measure(
        model, loss, inputs, targets, structures=("diag", "block", "kron"), damping=dampings
    )
    expected = reference_for(model, loss, inputs, targets, dampings, "relative")
    assert "block/direction_cosine@0.01/all" in expected
    assert_matches(m.scalars, expected)
    assert "block/direction_cosine/all" not in m.scalars
    assert "block/trace_ratio/all" in m.scalars  # undamped metrics carry no suffix


def test_batch_smaller_than_dimension_and_of_one():
    for n in (1, 2):
        model, inputs, targets, case = make_problem("mlp", "ce", n=n, seed=3)
        loss = case.module("mean")
        m = measure(model, loss, inputs, targets, structures=("diag", "block", "kron"))
        assert_matches(m.scalars, reference_for(model, loss, inputs, targets, [1e-3], "relative"))


@pytest.mark.parametrize("path", ["dense", "lowrank"])
def test_dense_and_lowrank_block_paths_agree(monkeypatch, path):
    """Forcing every layer through one path gives the same numbers as the automatic choice."""
    model, inputs, targets, case = make_problem("mlp", "mse3", n=7, seed=5)
    loss = case.module("mean")
    auto = measure(model, loss, inputs, targets, structures=("block",), damping=[1e-3, 0.1])
    monkeypatch.setattr(LayerFactors, "prefers_dense", lambda self: path == "dense")
    forced = measure(model, loss, inputs, targets, structures=("block",), damping=[1e-3, 0.1])
    for key, value in auto.scalars.items():
        if key.startswith("block/"):
            assert math.isclose(forced[key], value, rel_tol=1e-7, abs_tol=1e-10), key


def test_layers_and_diagonals_describe_the_model():
    model, inputs, targets, case = make_problem("mlp", "ce")
    loss = case.module("mean")
    m = measure(model, loss, inputs, targets, structures=("diag",))
    assert m.layer_names == ["0", "2", "4"]
    assert m.layers[1].parameter_names == ("2.weight",)
    assert m.layers[0].dimension == 25
    per_sample = reference.per_sample_gradients(model, loss, inputs, targets)
    F = reference.fisher(model, loss, inputs, targets)
    slices = reference.layer_slices(model)
    for name, s in slices.items():
        fisher_diag, ef_diag = m.diagonals[name]
        torch.testing.assert_close(fisher_diag, torch.diagonal(F)[s], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(
            ef_diag, per_sample[:, s].square().mean(0), rtol=1e-9, atol=1e-12
        )


def test_probe_scalars():
    model, inputs, targets, case = make_problem("mlp", "ce")
    loss = case.module("sum")
    m = measure(model, loss, inputs, targets)
    assert m["probe/loss"] == pytest.approx(float(loss(model(inputs), targets).detach()), rel=1e-12)
    assert m["probe/batch_size"] == 6
    g = reference.per_sample_gradients(model, loss, inputs, targets).mean(0)
    assert m["probe/grad_norm"] == pytest.approx(float(g.norm()), rel=1e-10)
    assert m["probe/seconds"] > 0


def test_frozen_weight_with_trainable_bias():
    model, inputs, targets, case = make_problem("mlp", "ce", seed=2)
    model[0].weight.requires_grad_(False)
    loss = case.module("mean")
    m = measure(model, loss, inputs, targets, structures=("diag", "block", "kron"))
    assert m.layers[0].parameter_names == ("0.bias",)
    assert_matches(m.scalars, reference_for(model, loss, inputs, targets, [1e-3], "relative"))


def test_float32_model_agrees_with_float64_reference():
    """Default float64 curvature arithmetic on a float32 model: errors at float32 level only."""
    model, inputs, targets, case = make_problem("mlp", "ce", n=8, seed=4)
    loss = case.module("mean")
    m32 = measure(model.float(), loss, inputs.float(), targets)
    expected = reference_for(model.double(), loss, inputs, targets, [1e-3], "relative")
    expected = {k: v for k, v in expected.items() if not k.startswith("kron/")}
    assert_matches(m32.scalars, expected, rtol=1e-3, atol=1e-6)


def test_sequence_linear_uses_weight_sharing_factors():
    """Linear layers applied over a sequence dimension (N, T, I): sums over positions."""

    class Pool(nn.Module):
        def forward(self, x):
            return x.mean(dim=1)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5, 2)).double()
    inputs = torch.randn(6, 5, 3, dtype=torch.float64)
    targets = torch.randint(0, 2, (6,))
    loss = nn.CrossEntropyLoss()
    m = measure(model, loss, inputs, targets, structures=("diag", "block", "kron"))
    assert_matches(m.scalars, reference_for(model, loss, inputs, targets, [1e-3], "relative"))


def test_keep_blocks_returns_the_dense_reference_blocks():
    model, inputs, targets, case = make_problem("cnn", "mse3")
    loss = case.module("sum")
    m = measure(model, loss, inputs, targets, structures=("diag",), keep_blocks=True)
    per_sample = reference.per_sample_gradients(model, loss, inputs, targets)
    F = reference.fisher(model, loss, inputs, targets)
    for name, s in reference.layer_slices(model).items():
        fisher, empirical, gradient = m.blocks[name]
        torch.testing.assert_close(fisher, F[s, s], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(
            empirical, reference.empirical_fisher(per_sample[:, s]), rtol=1e-9, atol=1e-12
        )
        torch.testing.assert_close(gradient, per_sample[:, s].mean(0), rtol=1e-9, atol=1e-12)
    big = torch.nn.Linear(100, 100)
    with pytest.raises(ValueError, match=r"limited to D ≤ 8192; too large: \(root\) \(D=10100\)"):
        measure(big, "mse", torch.randn(3, 100), torch.randn(3, 100), keep_blocks=True)


def test_keyword_inputs_and_a_language_model_output_are_measured_as_their_positional_twin():
    """A forward taking ``input_ids``/``attention_mask`` keywords (and a ``(1, T)`` position
    index shared by all samples) returning a ``ModelOutput``-like object with ``(N, T, C)``
    logits: measured through ``outputs=`` exactly like a positional twin returning
    ``(N, C, T)`` logits."""

    class Output:
        def __init__(self, logits):
            self.logits = logits

    class KeywordLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 4)
            self.position = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 6)

        def forward(self, input_ids, attention_mask=None, position_ids=None):
            hidden = torch.tanh(self.embed(input_ids) + self.position(position_ids))
            hidden = hidden * attention_mask.unsqueeze(-1)
            return Output(self.head(hidden))

    class PositionalTwin(nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask):
            positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
            out = self.lm(input_ids, attention_mask=attention_mask, position_ids=positions)
            return out.logits.transpose(1, 2)

    torch.manual_seed(0)
    lm = KeywordLM().double()
    ids, labels = torch.randint(0, 11, (6, 5)), torch.randint(0, 6, (6, 5))
    mask = torch.ones(6, 5, dtype=torch.float64)
    mask[0, 3:] = 0.0
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": torch.arange(5)[None]}
    keyword = measure(
        lm, nn.CrossEntropyLoss(), inputs, labels, outputs=lambda out: out.logits.transpose(1, 2)
    )
    twin = measure(PositionalTwin(lm), nn.CrossEntropyLoss(), (ids, mask), labels)
    assert keyword["probe/batch_size"] == 6
    renamed = {
        key.replace("/lm.", "/"): value
        for key, value in twin.scalars.items()
        if "seconds" not in key
    }
    assert_matches(keyword.scalars, renamed)
    with pytest.raises(ValueError, match="No keyword input has the targets' batch size 4"):
        measure(lm, nn.CrossEntropyLoss(), {"input_ids": ids}, labels[:4])
