"""The autograd backend (module hooks, batched backward passes) against the references.

Every metric of every structure on the reference problems of :mod:`cases`, and the
networks BackPACK cannot follow — functional code between layers, sliced outputs, tied
weights (as a module and through ``F.linear``), a class token added in ``forward``, a
transformer block with ``F.scaled_dot_product_attention``, Hugging Face's GPT-2 with its
``Conv1D`` layers and tied head — against the brute-force definitions or the torch.func
backend (itself tested against them), in float64.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import reference
from cases import LOSS_CASES, MODELS, make_problem
from fisher_monitor import measure
from fisher_monitor.backends import prepare
from fisher_monitor.likelihoods import resolve_loss
from reference_checks import assert_matches, reference_for

DAMPINGS = [1e-3, 1e-1]


def without_time(scalars: dict[str, float]) -> dict[str, float]:
    return {key: value for key, value in scalars.items() if not key.startswith("probe/sec")}


@pytest.mark.parametrize("loss_name", list(LOSS_CASES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_every_metric_matches_the_reference(model_name, loss_name):
    model, inputs, targets, case = make_problem(model_name, loss_name)
    loss = case.module("mean")
    m = measure(
        model,
        loss,
        inputs,
        targets,
        structures=("diag", "block", "kron"),
        backend="autograd",
        damping=DAMPINGS,
    )
    assert {entry["backend"] for entry in m.coverage} == {"autograd"}
    assert_matches(m.scalars, reference_for(model, loss, inputs, targets, DAMPINGS, "relative"))


def agrees_with_torch_func(model, loss, inputs, targets, structures=("diag", "block"), **kw):
    """The autograd backend's metrics equal the torch.func backend's (float64).

    Only the autograd backend has Kronecker factors (of its structured layers).
    """
    ours = measure(model, loss, inputs, targets, structures=structures, backend="autograd", **kw)
    theirs = measure(model, loss, inputs, targets, structures=structures, backend="functorch", **kw)
    expected = without_time(theirs.scalars)
    extra = set(without_time(ours.scalars)) - set(expected)
    assert set(expected) <= set(ours.scalars) and all(k.startswith("kron/") for k in extra)
    assert_matches(ours.scalars, expected, rtol=1e-7, atol=1e-10)
    return ours


class Functional(nn.Module):
    """What BackPACK's graph converter cannot follow: functions between layers, a slice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.norm = nn.LayerNorm(3 * 4 * 4)
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        h = F.max_pool2d(torch.relu(self.conv(x)), 2)
        h = self.norm(h.flatten(start_dim=1))
        return self.fc(h)[:, :4]


def test_functional_code_between_layers_and_a_sliced_output():
    torch.manual_seed(0)
    model = Functional().double()
    x = torch.randn(6, 2, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    m = agrees_with_torch_func(model, nn.CrossEntropyLoss(), x, y)
    auto = measure(model, nn.CrossEntropyLoss(), x, y)
    assert {entry["backend"] for entry in auto.coverage} == {"autograd"}
    assert any("BackPACK" in note and "autograd" in note for note in auto.notes), auto.notes
    assert any("norm (LayerNorm)" in note for note in m.notes)  # torch.func per module


class Grouped(nn.Module):
    """Grouped convolutions (ResNeXt/RegNet-style, and depthwise), one without bias, and a
    strided one whose positions do not cover the whole input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False)
        self.depthwise = nn.Conv2d(6, 6, 3, stride=2, groups=6)
        self.fc = nn.Linear(6 * 3 * 3, 5)

    def forward(self, x):
        h = torch.tanh(self.grouped(torch.relu(self.stem(x))))
        return self.fc(torch.tanh(self.depthwise(h)).flatten(start_dim=1))


def matches_both_references(model: nn.Module, samples: int, side: int):
    """The autograd backend on ``samples`` images of ``2 × side × side`` against torch.func
    and the dense float64 reference; returns the measurement and its problem."""
    x = torch.randn(samples, 2, side, side, dtype=torch.float64)
    y = torch.randint(0, 5, (samples,))
    loss = nn.CrossEntropyLoss()
    m = agrees_with_torch_func(model, loss, x, y, damping=DAMPINGS)
    assert_matches(m.scalars, reference.diag_and_block_metrics(model, loss, x, y, DAMPINGS))
    return m, x, y, loss


def test_grouped_convolutions_get_per_group_factors():
    torch.manual_seed(0)
    model = Grouped().double()
    m, x, y, loss = matches_both_references(model, 5, 7)
    factors = {entry["layer"]: entry["factors"] for entry in m.coverage}
    assert factors["grouped"] == factors["depthwise"] == "grouped weight-sharing outer products"
    assert factors["stem"] == "weight-sharing outer products"
    # the dense route (D ≤ R: few parameters, many samples) and tied uses agree too
    few = measure(model, loss, x.repeat(4, 1, 1, 1), y.repeat(4), backend="autograd")
    dense = measure(model, loss, x.repeat(4, 1, 1, 1), y.repeat(4), backend="functorch")
    assert_matches(few.scalars, without_time(dense.scalars), rtol=1e-7, atol=1e-10)


class GroupedOnePosition(nn.Module):
    """Grouped convolutions on a 1 × 1 map (RegNet's last stage on small images): one
    position per sample, with and without bias."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 3, stride=2)
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=3)
        self.plain = nn.Conv2d(6, 4, 1, groups=2, bias=False)
        self.pointwise = nn.Conv2d(4, 4, 1)  # ungrouped, one position
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.tanh(self.grouped(torch.relu(self.stem(x))))
        h = torch.tanh(self.pointwise(torch.tanh(self.plain(h))))
        return self.fc(h.flatten(start_dim=1))


@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_grouped_convolutions_on_one_position_are_batched_over_the_groups(monkeypatch, chunk_bytes):
    """``T = 1``: the groups' Grams and diagonals come from batched products (in chunks of
    groups, down to one group at a time), with the numbers of the per-group computation,
    of torch.func and of the dense reference."""
    from fisher_monitor.factors import grouped

    if chunk_bytes is not None:
        monkeypatch.setattr(grouped, "GROUP_CHUNK_BYTES", chunk_bytes)
    calls = []
    original = grouped.GroupedFactors._single_position_gram

    def counted(self, left, right):
        calls.append((left, right))
        return original(self, left, right)

    monkeypatch.setattr(grouped.GroupedFactors, "_single_position_gram", counted)
    torch.manual_seed(0)
    matches_both_references(GroupedOnePosition().double(), 7, 3)
    assert ("v", "v") in calls


def test_one_position_grams_equal_the_groups_summed():
    """The batched Grams and diagonals against the sum of the groups' own."""
    from fisher_monitor.factors import GroupedFactors, WeightSharingFactors

    g = torch.Generator().manual_seed(0)
    groups = [
        WeightSharingFactors(
            torch.randn(6, 1, 5, generator=g, dtype=torch.float64),
            torch.randn(6, 1, 3, generator=g, dtype=torch.float64),
            torch.randn(4, 6, 1, 3, generator=g, dtype=torch.float64),
            weight_columns=4,
            has_bias=True,
        )
        for _ in range(3)
    ]
    batched = GroupedFactors(groups, torch.float64)
    assert batched.single_position
    for group in groups:  # one group's own one-position Gram against the pair form
        sides = group._sides("v", torch.float64)
        torch.testing.assert_close(
            group.gram_v(), group._pair_gram(sides, sides, symmetric=True), rtol=1e-12, atol=0
        )
    for name in ("gram_u", "gram_v", "gram_uv"):
        expected = sum(getattr(group, name)() for group in groups)
        torch.testing.assert_close(getattr(batched, name)(), expected, rtol=1e-12, atol=0)
    fisher, empirical = batched.diagonals()
    pieces = [group.diagonals() for group in groups]
    torch.testing.assert_close(
        fisher, batched._assemble([f for f, _ in pieces]), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        empirical, batched._assemble([e for _, e in pieces]), rtol=1e-12, atol=0
    )


def test_convolutions_of_many_groups_are_materialised_by_one_product(monkeypatch):
    """Above ``MAX_FACTOR_GROUPS`` (depthwise convolutions of wide networks) the columns
    are materialised by one batched product of the groups, with the same numbers."""
    from fisher_monitor.backends import structured

    monkeypatch.setattr(structured, "MAX_FACTOR_GROUPS", 2)
    torch.manual_seed(0)
    model = Grouped().double()
    x = torch.randn(5, 2, 7, 7, dtype=torch.float64)
    y = torch.randint(0, 5, (5,))
    m = agrees_with_torch_func(model, nn.CrossEntropyLoss(), x, y, damping=DAMPINGS)
    factors = {entry["layer"]: entry["factors"] for entry in m.coverage}
    assert factors["grouped"] == "grouped weight-sharing outer products"  # 2 groups
    assert factors["depthwise"] == "per-sample pull-backs of its module"  # 6 groups


class TwiceGrouped(nn.Module):
    """One grouped convolution applied twice: its per-sample gradient sums both uses."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(torch.tanh(self.conv(x)))).flatten(start_dim=1))


def test_a_grouped_convolution_used_twice_is_one_layer():
    torch.manual_seed(0)
    model = TwiceGrouped().double()
    x = torch.randn(4, 4, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    agrees_with_torch_func(model, nn.CrossEntropyLoss(), x, y, damping=DAMPINGS)


class TiedLM(nn.Module):
    """An embedding whose matrix is also the output layer's (a module use or ``F.linear``)."""

    def __init__(self, functional: bool, vocabulary: int = 9, width: int = 4):
        super().__init__()
        self.functional = functional
        self.embed = nn.Embedding(vocabulary, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocabulary, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        hidden = torch.tanh(self.mix(self.embed(tokens)))
        logits = F.linear(hidden, self.embed.weight) if self.functional else self.head(hidden)
        return logits.transpose(1, 2)


@pytest.mark.parametrize("functional", [False, True], ids=["module", "F.linear"])
def test_tied_weights_are_one_layer_summed_over_their_uses(functional):
    torch.manual_seed(1)
    model = TiedLM(functional).double()
    tokens = torch.randint(0, 9, (5, 3))
    targets = torch.randint(0, 9, (5, 3))
    loss = nn.CrossEntropyLoss()
    m = measure(model, loss, tokens, targets, backend="autograd", damping=DAMPINGS)
    layers = {info.name: info for info in m.layers}
    assert set(layers) == {"embed", "mix"} and layers["embed"].shared_with == ("head",)
    assert_matches(
        m.scalars, reference.diag_and_block_metrics(model, loss, tokens, targets, DAMPINGS)
    )
    if functional:
        assert any("whole network" in note and "embed" in note for note in m.notes)
    assert measure(model, loss, tokens, targets).coverage[0]["backend"] == "autograd"


class ClassToken(nn.Module):
    """A parameter used in ``forward`` outside any module call (a ViT's class token)."""

    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, 3))
        self.proj = nn.Linear(3, 3)
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        tokens = torch.cat([self.token.expand(x.shape[0], -1, -1), self.proj(x)], dim=1)
        return self.head(tokens.mean(dim=1))


def test_a_parameter_used_outside_any_module_is_measured_through_the_network():
    torch.manual_seed(2)
    model = ClassToken().double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    m = agrees_with_torch_func(model, nn.CrossEntropyLoss(), x, y)
    assert any("torch.func" in note and "(root)" in note for note in m.notes), m.notes


class Block(nn.Module):
    """A pre-norm transformer block with ``F.scaled_dot_product_attention``."""

    def __init__(self, width: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    def forward(self, x):
        n, t, w = x.shape
        q, k, v = self.qkv(self.norm(x)).view(n, t, 3, self.heads, w // self.heads).unbind(2)
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.out(attended.transpose(1, 2).reshape(n, t, w))
        return x + self.mlp(x)


class TinyTransformer(nn.Module):
    def __init__(self, vocabulary: int = 11, width: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.block = Block(width)
        self.head = nn.Linear(width, vocabulary)

    def forward(self, tokens):
        return self.head(self.block(self.embed(tokens))).transpose(1, 2)


def test_a_transformer_block_gets_compact_factors_for_its_projections():
    torch.manual_seed(3)
    model = TinyTransformer().double()
    tokens = torch.randint(0, 11, (4, 5))
    targets = torch.randint(0, 11, (4, 5))
    m = agrees_with_torch_func(
        model, nn.CrossEntropyLoss(), tokens, targets, structures=("diag", "block", "kron")
    )
    assert "kron/trace_ratio/block.qkv" in m.scalars  # weight-sharing factors: Kronecker too
    assert "kron/trace_ratio/embed" in m.scalars  # lookups as one-hot inputs: Kronecker too
    assert "kron/trace_ratio/block.norm" not in m.scalars  # a normalisation has none
    methods = {entry["layer"]: entry["factors"] for entry in m.coverage}
    assert methods["embed"] == "weight-sharing outer products"


def test_embeddings_with_padding_and_one_lookup_per_sample():
    torch.manual_seed(7)

    class Lookup(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens = nn.Embedding(9, 3, padding_idx=0)
            self.label = nn.Embedding(4, 3)
            self.head = nn.Linear(3, 5)

        def forward(self, tokens, label):
            return self.head(self.tokens(tokens).mean(1) + self.label(label))

    model = Lookup().double()
    tokens = torch.randint(0, 9, (6, 4))
    tokens[:, -1] = 0  # padding
    label = torch.randint(0, 4, (6,))
    m = agrees_with_torch_func(
        model, nn.CrossEntropyLoss(), (tokens, label), torch.randint(0, 5, (6,))
    )
    methods = {entry["layer"]: entry["factors"] for entry in m.coverage}
    assert methods["tokens"] == "weight-sharing outer products"
    assert methods["label"] == "outer products"


class ScaledEmbedding(nn.Embedding):
    """A lookup times a constant (BART's and Gemma's scaled word embeddings)."""

    def forward(self, ids):
        return super().forward(ids) * 2.5


class LearnedPositions(nn.Embedding):
    """A lookup of positions it builds itself from its input's shape (BART's): its input
    is not the indices it looks up, and may be a float tensor."""

    def forward(self, hidden):
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        return super().forward(positions + 2).expand(hidden.shape[0], -1, -1)


class Rescaled(nn.Linear):
    """A Linear whose output is rescaled in its own forward."""

    def forward(self, x):
        return super().forward(x) * 0.5


def test_subclasses_with_their_own_forward_are_measured_as_they_compute():
    """Compact factors assume the base class's forward; a subclass that overrides it is
    measured by its module's pull-back, with the same numbers as torch.func."""
    torch.manual_seed(3)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens = ScaledEmbedding(9, 4)
            self.positions = LearnedPositions(8, 4)
            self.mix = Rescaled(4, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, ids):
            x = self.tokens(ids)
            x = x + self.positions(x)
            return self.head(torch.tanh(self.mix(x)).mean(1))

    model = Encoder().double()
    ids = torch.randint(0, 9, (6, 5))
    m = agrees_with_torch_func(model, nn.CrossEntropyLoss(), ids, torch.randint(0, 3, (6,)))
    methods = {entry["layer"]: entry["factors"] for entry in m.coverage}
    assert methods["head"] == "outer products"
    for layer in ("tokens", "positions", "mix"):
        assert methods[layer] != "weight-sharing outer products", layer
    assert {entry["backend"] for entry in m.coverage} == {"autograd"}


@pytest.mark.slow
def test_hugging_face_gpt2_with_its_tied_head():
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = transformers.GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=8,
        vocab_size=13,
        n_positions=8,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(4)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 13, (3, 5))
    inputs = {"input_ids": ids[:, :-1]}
    m = agrees_with_torch_func(
        model,
        nn.CrossEntropyLoss(),
        inputs,
        ids[:, 1:],
        outputs=lambda out: out.logits.transpose(1, 2),
    )
    layers = {info.name: info for info in m.layers}
    assert layers["transformer.wte"].shared_with == ("lm_head",)
    assert "block/direction_cosine/transformer.h.0.attn.c_attn" in m.scalars
    prepared = prepare(model, resolve_loss("cross_entropy"), "autograd")
    try:  # Conv1D (weight stored as I × O) has compact factors
        assert prepared.factor_form(model.transformer.h[0].attn.c_attn, torch.zeros(1, 1)) in (
            "outer",
            "shared",
        )
    finally:
        prepared.close()


class Normalised(nn.Module):
    """BatchNorm (eval), GroupNorm and LayerNorm between functional activations."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.batch = nn.BatchNorm2d(4)
        self.group = nn.GroupNorm(2, 4)
        self.layer = nn.LayerNorm([4, 4, 4])
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        h = F.silu(self.batch(self.conv(x)))
        h = torch.tanh(self.group(h))
        return self.fc(self.layer(F.avg_pool2d(h, 2)).flatten(1))


def test_normalisations_have_closed_form_pull_backs():
    torch.manual_seed(5)
    model = Normalised().double()
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        model.batch.running_mean.uniform_(-0.5, 0.5)
        model.batch.running_var.uniform_(0.5, 2.0)
        for norm in (model.batch, model.group, model.layer):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    m = agrees_with_torch_func(model, nn.CrossEntropyLoss(), x, y)
    methods = {entry["layer"]: entry["factors"] for entry in m.coverage}
    assert methods["conv"] == "weight-sharing outer products"
    assert methods["fc"] == "outer products"
    assert methods["batch"] == methods["layer"] == "per-sample pull-backs of its module"


def test_coverage_says_which_structure_had_no_form_for_a_layer():
    torch.manual_seed(6)
    model = Functional().double()
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (4,))
    m = measure(model, nn.CrossEntropyLoss(), x, y, structures=("diag", "kron"))
    by_layer = {entry["layer"]: entry["estimator"] for entry in m.coverage}
    assert by_layer["conv"] == {"diag": "exact", "kron": "exact"}
    assert by_layer["norm"] == {"diag": "exact", "kron": None}  # no Kronecker factors
    functorch = measure(
        model, nn.CrossEntropyLoss(), x, y, structures=("diag", "kron"), backend="functorch"
    )
    assert all(entry["estimator"]["kron"] is None for entry in functorch.coverage)
