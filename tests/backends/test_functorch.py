"""The torch.func backend against the dense reference, on models BackPACK can and cannot run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reference
from cases import LOSS_CASES, MODELS, make_problem
from fisher_monitor import measure
from reference_checks import assert_matches


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_name", list(LOSS_CASES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_functorch_backend_matches_reference(model_name, loss_name, reduction):
    model, inputs, targets, case = make_problem(model_name, loss_name)
    loss = case.module(reduction)
    m = measure(model, loss, inputs, targets, structures=("diag", "block"), backend="functorch")
    assert_matches(m.scalars, reference.diag_and_block_metrics(model, loss, inputs, targets))
    assert {entry["backend"] for entry in m.coverage} == {"functorch"}


def test_both_backends_agree_and_chunking_does_not_matter():
    model, inputs, targets, case = make_problem("cnn", "ce", n=11, seed=3)
    loss = case.module("mean")
    kwargs = dict(structures=("diag", "block"), damping=[1e-3, 0.1])
    backpack = measure(model, loss, inputs, targets, backend="backpack", **kwargs)
    functorch = measure(model, loss, inputs, targets, backend="functorch", **kwargs)
    for key, value in backpack.scalars.items():
        if key != "probe/seconds":
            assert functorch[key] == pytest.approx(value, rel=1e-8, abs=1e-12), key
    from fisher_monitor.backends import functorch as functorch_backend

    original = functorch_backend.DEFAULT_CHUNK
    try:
        functorch_backend.DEFAULT_CHUNK = 3  # 11 samples in chunks of 3, 3, 3, 2
        chunked = measure(model, loss, inputs, targets, backend="functorch", **kwargs)
    finally:
        functorch_backend.DEFAULT_CHUNK = original
    for key, value in functorch.scalars.items():
        if key != "probe/seconds":
            assert chunked[key] == pytest.approx(value, rel=1e-10, abs=1e-14), key


def test_monte_carlo_on_the_functorch_backend_is_reproducible_and_unbiased():
    model, inputs, targets, case = make_problem("mlp", "mse3", n=5, seed=4)
    loss = case.module("mean")
    kwargs = dict(structures=("diag",), fisher="mc", backend="functorch")
    first = measure(
        model, loss, inputs, targets, generator=torch.Generator().manual_seed(1), **kwargs
    )
    again = measure(
        model, loss, inputs, targets, generator=torch.Generator().manual_seed(1), **kwargs
    )
    assert first["diag/kl/all"] == again["diag/kl/all"]
    exact = measure(model, loss, inputs, targets, structures=("diag",), backend="functorch")
    generator = torch.Generator().manual_seed(2)
    many = torch.stack(
        [
            torch.cat(
                [
                    d[0]
                    for d in measure(
                        model, loss, inputs, targets, generator=generator, **kwargs
                    ).diagonals.values()
                ]
            )
            for _ in range(200)
        ]
    )
    target = torch.cat([d[0] for d in exact.diagonals.values()])
    z = (many.mean(0) - target) / (many.std(0) / 200**0.5 + 1e-300)
    assert z[many.std(0) > 0].abs().max() < 5  # see test_montecarlo.py for the reading


class TinyTransformer(nn.Module):
    """Embedding, LayerNorm, self-attention with a residual, GELU MLP, mean pooling."""

    def __init__(self, vocab: int = 11, width: int = 8, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, num_heads=2, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 16), nn.GELU(), nn.Linear(16, width))
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        h = self.embed(tokens)
        a = self.norm1(h)
        h = h + self.attention(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return self.head(h.mean(dim=1))


class ResidualConvBlock(nn.Module):
    """Conv-BatchNorm-ReLU twice with a skip connection, then pooling and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.pool = nn.Sequential(nn.AvgPool2d(5), nn.Flatten())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.stem(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.relu(out + x)
        return self.head(self.pool(out))


def test_transformer_block_matches_reference():
    torch.manual_seed(0)
    model = TinyTransformer().double()
    tokens = torch.randint(0, 11, (6, 5))
    targets = torch.randint(0, 3, (6,))
    loss = nn.CrossEntropyLoss()
    auto = measure(model, loss, tokens, targets, structures=("diag", "block"))
    assert any("measured with autograd with module hooks" in note for note in auto.notes)
    m = measure(model, loss, tokens, targets, structures=("diag", "block"), backend="functorch")
    names = [entry["layer"] for entry in m.coverage]
    # a block is all trainable parameters of one module: attention's own in-projection,
    # and its output projection (a submodule) separately
    assert names == [
        "embed",
        "norm1",
        "attention",
        "attention.out_proj",
        "norm2",
        "mlp.0",
        "mlp.2",
        "head",
    ]
    assert all(entry["measured"] and entry["backend"] == "functorch" for entry in m.coverage)
    assert_matches(m.scalars, reference.diag_and_block_metrics(model, loss, tokens, targets))


@pytest.mark.parametrize("backend", ["backpack", "functorch"])
def test_residual_conv_block_with_batchnorm_and_inplace_relu(backend):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # BackPACK's AvgPool Jacobian uses the default dtype
    try:
        _residual_block_case(backend)
    finally:
        torch.set_default_dtype(previous)


def _residual_block_case(backend):
    torch.manual_seed(1)
    model = ResidualConvBlock().double()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
    model.eval()
    inputs = torch.randn(6, 1, 5, 5, dtype=torch.float64)
    targets = torch.randint(0, 3, (6,))
    loss = nn.CrossEntropyLoss()
    m = measure(model, loss, inputs, targets, structures=("diag", "block"), backend=backend)
    assert_matches(m.scalars, reference.diag_and_block_metrics(model, loss, inputs, targets))
    assert model.relu.inplace is True  # the caller's module is untouched
