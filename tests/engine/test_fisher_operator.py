"""Matrix-free Fisher-vector products against the exact dense blocks (float64 references)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fisher_monitor import measure
from fisher_monitor.backends import prepare
from fisher_monitor.engine.fisher_operator import NetworkFunction, dense_layer_fisher
from fisher_monitor.likelihoods import resolve_loss


class TinyLM(nn.Module):
    """Embedding → residual MLP over positions → LayerNorm → Linear head, ``(N, C, T)``."""

    def __init__(self, vocabulary: int = 20, width: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.mix = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary)

    def forward(self, tokens):
        hidden = self.embed(tokens)
        hidden = self.norm(hidden + torch.tanh(self.mix(hidden)))
        return self.head(hidden).transpose(1, 2)


class Attention(nn.Module):
    """``F.scaled_dot_product_attention`` (fused kernels have no forward-mode derivative)."""

    def __init__(self, width: int = 4, classes: int = 5):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, classes)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        mixed = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(mixed).transpose(1, 2)


def _problem(kind: str):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "classifier":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 7))
        inputs = torch.randn(6, 4, generator=generator)
        return model, inputs, torch.randint(0, 7, (6,), generator=generator), "cross_entropy"
    if kind == "regression":
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        inputs = torch.randn(5, 3, generator=generator)
        return model, inputs, torch.randn(5, 2, generator=generator), "mse"
    if kind == "binary":
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        inputs = torch.randn(7, 3, generator=generator)
        targets = torch.randint(0, 2, (7, 1), generator=generator).float()
        return model, inputs, targets, "bce_with_logits"
    if kind == "conv":
        model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv1d(3, 4, 1))
        inputs = torch.randn(4, 2, 5, generator=generator)
        return model, inputs, torch.randint(0, 4, (4, 5), generator=generator), "cross_entropy"
    if kind == "attention":
        inputs = torch.randn(3, 4, 4, generator=generator)
        return (
            Attention(),
            inputs,
            torch.randint(0, 5, (3, 4), generator=generator),
            "cross_entropy",
        )
    model = TinyLM()
    tokens = torch.randint(0, 20, (3, 5), generator=generator)
    return model, tokens, torch.randint(0, 20, (3, 5), generator=generator), "cross_entropy"


@pytest.mark.parametrize(
    ("kind", "backend"),
    [
        ("classifier", "backpack"),
        ("classifier", "functorch"),
        ("regression", "backpack"),
        ("binary", "functorch"),
        ("conv", "backpack"),
        ("sequence", "functorch"),
        ("attention", "functorch"),
    ],
)
def test_products_equal_the_exact_blocks(kind, backend):
    """``F_b`` from ``D_b`` products equals the exact path's dense block (float64 model)."""
    model, inputs, targets, loss = _problem(kind)
    model = model.double()
    inputs = inputs.double() if inputs.is_floating_point() else inputs
    targets = targets.double() if targets.is_floating_point() else targets
    exact = measure(model, loss, inputs, targets, structures=("block",), keep_blocks=True)
    prepared = prepare(model, resolve_loss(loss), backend)
    try:
        function = NetworkFunction(prepared, inputs, seed=0)
        for info, _ in prepared.layers:
            fisher = dense_layer_fisher(function, info.parameter_names)
            expected = exact.blocks[info.name][0]
            torch.testing.assert_close(
                fisher, expected, rtol=1e-9, atol=1e-12 * expected.abs().max()
            )
        function.close()
    finally:
        prepared.close()


def test_a_float32_network_is_multiplied_in_float64():
    """The products of a float32 network equal those of its float64 copy to float64 rounding."""
    model, inputs, targets, loss = _problem("classifier")
    wide = measure(
        model.double(), loss, inputs.double(), targets, structures=("block",), keep_blocks=True
    )
    model = model.float()
    prepared = prepare(model, resolve_loss(loss), "functorch")
    try:
        function = NetworkFunction(prepared, inputs.float(), seed=0)
        assert function.dtype == torch.float64 and not function.notes
        for info, _ in prepared.layers:
            fisher = dense_layer_fisher(function, info.parameter_names)
            expected = wide.blocks[info.name][0]
            # the float32 weights are exactly representable: only the products' rounding differs
            torch.testing.assert_close(fisher, expected, rtol=1e-6, atol=1e-9)
    finally:
        prepared.close()


def test_folded_head_gives_the_plain_products_and_is_used():
    """Below the head, products stop at its input (``G = WᵀH̃W`` per position): same numbers."""
    model, tokens, _, loss = _problem("sequence")
    model = model.double()
    prepared = prepare(model, resolve_loss(loss), "functorch")
    try:
        folded = NetworkFunction(prepared, tokens, seed=0)
        plain = NetworkFunction(prepared, tokens, seed=0, fold=False)
        head = folded.folded_head()
        assert head is not None and head.curvature.shape == (3, 5, 4, 4)
        assert plain.folded_head() is None
        calls = []
        original = head.head_input

        def counting(overrides):
            calls.append(1)
            return original(overrides)

        head.head_input = counting
        for info, _ in prepared.layers:
            got = dense_layer_fisher(folded, info.parameter_names)
            want = dense_layer_fisher(plain, info.parameter_names)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13 * want.abs().max())
        assert calls  # the body layers used the folded products
        folded.close()
    finally:
        prepared.close()


def test_dropout_draws_the_same_masks_in_every_product():
    """In train mode the operator is one fixed symmetric matrix (the measurement's masks)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    inputs = torch.randn(6, 4, dtype=torch.float64)
    prepared = prepare(model, resolve_loss("cross_entropy"), "functorch")
    state = torch.random.get_rng_state()
    try:
        function = NetworkFunction(prepared, inputs, seed=5)
        operator = function.operator(["0.weight", "0.bias"])
        v = torch.randn(2, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        first, second = operator(v), operator(v)
        assert torch.equal(first, second)
        assert float(v[0] @ first[1]) == pytest.approx(float(v[1] @ first[0]), rel=1e-10)
        assert float(first.norm()) > 0
    finally:
        prepared.close()
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
