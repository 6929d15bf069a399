"""Residual CNNs on the BackPACK backend: torchvision-style blocks against the references.

The tiny ResNet below has every module type of torchvision's ResNet-18 (Conv2d without
bias, BatchNorm2d in eval mode, ``ReLU(inplace=True)``, the in-place residual addition,
MaxPool2d, ``AdaptiveAvgPool2d((1, 1))``, ``torch.flatten``, Linear) at a size the dense
float64 reference handles in a second.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reference
from fisher_monitor import measure
from fisher_monitor.backends import prepare
from fisher_monitor.backends.backpack.pooling import AdaptiveAvgPoolDerivatives, pooling_matrix
from fisher_monitor.factors import WeightSharingFactors, to_parameter_order
from fisher_monitor.factors import weight_sharing as factor_module
from fisher_monitor.likelihoods import resolve_loss
from reference_checks import assert_matches

RTOL = 1e-7
STRUCTURES = ("diag", "block")


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: two 3×3 convolutions and an in-place residual add."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """A ResNet-18 in miniature (stem, two stages, global pooling, classifier)."""

    def __init__(self, classes: int = 3, pool=(1, 1)):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(2)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = BasicBlock(2, 2)
        self.layer2 = BasicBlock(2, 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(pool)
        self.fc = nn.Linear(3 * pool[0] * pool[1], classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def tiny_resnet(seed: int = 0, pool=(1, 1), freeze_batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyResNet(pool=pool)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
                if freeze_batchnorm:
                    module.requires_grad_(False)
    return model.double().eval()


def problem(seed: int = 0, pool=(1, 1), freeze_batchnorm: bool = False, n: int = 5, size=8):
    model = tiny_resnet(seed, pool, freeze_batchnorm)
    generator = torch.Generator().manual_seed(seed + 1)
    inputs = torch.randn(n, 1, size, size, dtype=torch.float64, generator=generator)
    targets = torch.randint(0, 3, (n,), generator=generator)
    return model, nn.CrossEntropyLoss(), inputs, targets


def test_tiny_resnet_prepares_on_backpack_with_every_layer():
    model, loss, _, _ = problem()
    prepared = prepare(model, resolve_loss(loss), "backpack")
    try:
        assert prepared.backend == "backpack"
        assert any("converter" in note for note in prepared.preparation_notes)
        assert not any("torch.func" in note for note in prepared.preparation_notes)
        names = [info.name for info, _ in prepared.layers]
        assert "layer2.downsample.0" in names and "layer2.downsample.1" in names
    finally:
        prepared.close()


@pytest.mark.parametrize("pool", [(1, 1), (2, 1)])
@pytest.mark.slow
def test_tiny_resnet_matches_dense_reference(pool):
    """diag and block, BackPACK backend against the float64 dense reference (1e-7)."""
    model, loss, inputs, targets = problem(pool=pool)
    m = measure(model, loss, inputs, targets, structures=STRUCTURES, backend="backpack")
    assert m.coverage[0]["backend"] == "backpack"
    expected = reference.diag_and_block_metrics(model, loss, inputs, targets)
    assert_matches(m.scalars, expected, rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("fisher", ["exact", "mc"])
@pytest.mark.slow
def test_tiny_resnet_backpack_agrees_with_functorch(fisher):
    model, loss, inputs, targets = problem(seed=1)
    results = {
        backend: measure(
            model,
            loss,
            inputs,
            targets,
            structures=STRUCTURES,
            backend=backend,
            fisher=fisher,
            mc_samples=2,
            generator=torch.Generator().manual_seed(7),
        )
        for backend in ("backpack", "functorch")
    }
    backpack, functorch = results["backpack"], results["functorch"]
    assert backpack.coverage[0]["backend"] == "backpack"
    assert functorch.coverage[0]["backend"] == "functorch"
    expected = {k: v for k, v in functorch.scalars.items() if not k.startswith("probe/")}
    assert_matches(backpack.scalars, expected, rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("size", [8, 4])
@pytest.mark.slow
def test_tiny_resnet_kron_matches_kfc_reference(size):
    """kron on the convolutions (KFC) and the classifier; BatchNorm frozen, so every layer
    has Kronecker factors and the dense KFC reference covers the whole network. On 4 × 4
    inputs the second stage's convolutions have one output position (outer products)."""
    model, loss, inputs, targets = problem(seed=2, freeze_batchnorm=True, size=size)
    m = measure(model, loss, inputs, targets, structures=("kron",), backend="backpack")
    expected = reference.kronecker_reference_metrics(
        model, loss, inputs, targets, [1e-3], "relative"
    )
    assert_matches(m.scalars, expected, rtol=RTOL, atol=1e-12)
    assert "kron/trace_ratio/layer2.downsample.0" in m.scalars


def test_tiny_resnet_kron_notes_batchnorm():
    model, loss, inputs, targets = problem()
    m = measure(model, loss, inputs, targets, structures=("kron",), backend="backpack")
    assert "kron/trace_ratio/layer1.conv1" in m.scalars
    assert "kron/trace_ratio/layer1.bn1" not in m.scalars
    assert any(
        "no Kronecker factorisation for" in note and "BatchNorm2d" in note for note in m.notes
    )


def test_float64_network_with_adaptive_pooling_under_float32_default():
    """The pooling Jacobian takes the columns' type (BackPACK's own AvgPool uses the default)."""
    model, loss, inputs, targets = problem(seed=4)
    assert torch.get_default_dtype() == torch.float32
    m = measure(model, loss, inputs, targets, structures=("diag",), backend="backpack")
    expected = reference.diag_and_block_metrics(model, loss, inputs, targets)
    assert_matches(
        m.scalars, {k: v for k, v in expected.items() if k.startswith("diag/")}, rtol=RTOL
    )


@pytest.mark.parametrize(
    ("dimensions", "size_in", "size_out"),
    [(1, (7,), (3,)), (2, (5, 4), (2, 3)), (2, (4, 4), (1, 1)), (3, (3, 5, 2), (2, 2, 1))],
)
def test_adaptive_pooling_jacobians_match_autograd(dimensions, size_in, size_out):
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
    module = pool[dimensions](size_out)
    x = torch.randn(2, 3, *size_in, dtype=torch.float64, requires_grad=True)
    out = module(x)
    module.input0, module.output = x.detach(), out.detach()
    derivatives = AdaptiveAvgPoolDerivatives(dimensions)
    columns = torch.randn(4, *out.shape, dtype=torch.float64)
    expected = torch.stack([torch.autograd.grad(out, x, c, retain_graph=True)[0] for c in columns])
    got = derivatives.jac_t_mat_prod(module, None, None, columns)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-14)
    vectors = torch.randn(4, *x.shape, dtype=torch.float64)
    forward = torch.stack([module(v) for v in vectors])
    torch.testing.assert_close(
        derivatives.jac_mat_prod(module, None, None, vectors), forward, rtol=1e-14, atol=1e-14
    )


def test_pooling_matrix_rows_average_pytorch_windows():
    matrix = pooling_matrix(7, 3, torch.float64, "cpu")
    x = torch.randn(7, dtype=torch.float64)
    expected = nn.functional.adaptive_avg_pool1d(x.view(1, 1, 7), 3).view(3)
    torch.testing.assert_close(matrix @ x, expected, rtol=1e-15, atol=1e-15)


# ------------------------------------------------- torch.func pull-backs within BackPACK


def hybrid_case(name: str):
    torch.manual_seed(5)
    if name == "mlp_layernorm_gelu":
        model = nn.Sequential(
            nn.Linear(5, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 4), nn.SiLU(), nn.Linear(4, 3)
        )
        inputs = torch.randn(6, 5, dtype=torch.float64)
        names = ["'1' (LayerNorm)", "'2' (GELU)", "'4' (SiLU)"]
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.GroupNorm(2, 4),
            nn.SiLU(),
            nn.Conv2d(4, 2, 3),
            nn.Hardswish(),
            nn.Flatten(),
            nn.Linear(2 * 4 * 4, 3),
        )
        inputs = torch.randn(5, 1, 6, 6, dtype=torch.float64)
        names = ["'1' (GroupNorm)", "'2' (SiLU)", "'4' (Hardswish)"]
    targets = torch.randint(0, 3, (inputs.shape[0],))
    return model.double(), nn.CrossEntropyLoss(), inputs, targets, names


@pytest.mark.parametrize("name", ["mlp_layernorm_gelu", "cnn_groupnorm_silu"])
def test_modules_without_backpack_extension_are_pulled_back_by_torch_func(name):
    """LayerNorm, GroupNorm, GELU, SiLU, Hardswish: torch.func within the BackPACK pass,
    everything else (and the Kronecker factors of the Linear/Conv layers) from BackPACK."""
    model, loss, inputs, targets, names = hybrid_case(name)
    m = measure(model, loss, inputs, targets, structures=("diag", "block", "kron"))
    assert {entry["backend"] for entry in m.coverage} == {"backpack"}
    assert any("pulled back with torch.func" in n and all(x in n for x in names) for n in m.notes)
    expected = reference.diag_and_block_metrics(model, loss, inputs, targets)
    assert_matches(m.scalars, expected, rtol=RTOL, atol=1e-12)
    assert "kron/trace_ratio/0" in m.scalars and "kron/trace_ratio/1" not in m.scalars
    functorch = measure(
        model,
        loss,
        inputs,
        targets,
        structures=("diag", "block"),
        backend="functorch",
        fisher="mc",
        generator=torch.Generator().manual_seed(3),
    )
    hybrid = measure(
        model,
        loss,
        inputs,
        targets,
        structures=("diag", "block"),
        backend="backpack",
        fisher="mc",
        generator=torch.Generator().manual_seed(3),
    )
    expected = {k: v for k, v in functorch.scalars.items() if not k.startswith("probe/")}
    assert_matches(hybrid.scalars, expected, rtol=RTOL, atol=1e-12)


def test_modules_drawing_random_numbers_are_not_pulled_back():
    """A torch.func pull-back would recompute the module with new random numbers."""
    from fisher_monitor.backends import UnsupportedNetworkError

    model = nn.Sequential(nn.Linear(3, 4), nn.RReLU(), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(UnsupportedNetworkError) as caught:
        prepare(model, resolve_loss("cross_entropy"), "backpack")
    assert caught.value.modules == ["'1' (RReLU)"]
    assert "pulled back by torch.func" in caught.value.fix


# ------------------------------------------------------------ weight-sharing factor forms


def dense_columns(inputs, output_grads, sqrt, weight_columns, has_bias):
    """``V`` (``R·N × D``) and ``U`` (``N × D``, ``g_n/√N``), by the definition."""
    n = inputs.shape[0]
    v = torch.einsum("rnto,nti->rnoi", sqrt, inputs)
    u = torch.einsum("nto,nti->noi", output_grads, inputs) / n**0.5
    v = to_parameter_order(v, weight_columns, has_bias)
    u = to_parameter_order(u, weight_columns, has_bias)
    return v.reshape(-1, v.shape[-1]), u


@pytest.mark.parametrize("positions", [1, 3, 9])
@pytest.mark.parametrize("force", ["pairs", "materialised", "chunked"])
def test_weight_sharing_forms_match_dense_columns(positions, force, monkeypatch):
    """Both forms (position pairs and materialised columns, in small chunks or not) of every
    quantity against the explicit ``V`` and ``U``."""
    generator = torch.Generator().manual_seed(positions)
    n, i, o, r = 4, 5, 3, 2
    inputs = torch.randn(n, positions, i, dtype=torch.float64, generator=generator)
    inputs[..., -1] = 1.0  # the bias column
    grads = torch.randn(n, positions, o, dtype=torch.float64, generator=generator)
    sqrt = torch.randn(r, n, positions, o, dtype=torch.float64, generator=generator)
    if force == "pairs":
        monkeypatch.setattr(factor_module, "weight_sharing_costs", lambda *a: (1, 0))
        monkeypatch.setattr(factor_module, "weight_sharing_diagonal_costs", lambda *a: (1, 0))
    else:
        monkeypatch.setattr(factor_module, "weight_sharing_costs", lambda *a: (0, 1))
        monkeypatch.setattr(factor_module, "weight_sharing_diagonal_costs", lambda *a: (0, 1))
    if force == "chunked":
        monkeypatch.setattr(factor_module, "CHUNK_BYTES", 64)
        monkeypatch.setattr(factor_module, "_DIAGONAL_CHUNK_BYTES", 64)
        monkeypatch.setattr(factor_module, "_PAIR_CHUNK_BYTES", 64)
    factors = WeightSharingFactors(inputs, grads, sqrt, i - 1, True)
    v, u = dense_columns(inputs, grads, sqrt, i - 1, True)

    def close(got, want):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    fisher, empirical = factors.diagonals()
    close(fisher, v.square().sum(dim=0))
    close(empirical, u.square().sum(dim=0))
    close(factors.mean_gradient(), u.sum(dim=0) / n**0.5)
    close(factors.gram_v(), v @ v.T)
    close(factors.gram_u(), u @ u.T)
    close(factors.gram_uv(), u @ v.T)
    dense_f, dense_ef, gradient = factors.dense_blocks()
    close(dense_f, v.T @ v)
    close(dense_ef, u.T @ u)
    close(gradient, u.sum(dim=0) / n**0.5)
    weights = torch.randn(r * n, dtype=torch.float64, generator=generator)
    close(factors.v_combination(weights), weights @ v)
    close(factors.u_combination(weights[:n]), weights[:n] @ u)


@pytest.mark.parametrize("positions", [1, 4])
def test_weight_sharing_kronecker_factors_follow_kfc(positions):
    generator = torch.Generator().manual_seed(11)
    n, i, o, r = 3, 4, 2, 3
    inputs = torch.randn(n, positions, i, dtype=torch.float64, generator=generator)
    grads = torch.randn(n, positions, o, dtype=torch.float64, generator=generator)
    sqrt = torch.randn(r, n, positions, o, dtype=torch.float64, generator=generator)
    kron = WeightSharingFactors(inputs, grads, sqrt, i, False).kronecker()
    x, s = inputs.reshape(-1, i), sqrt.reshape(-1, o)
    pairs = [
        (kron.input_factor, kron.input_root, x.T @ x / n),
        (kron.output_factor, kron.output_root, s.T @ s / positions),
    ]
    for factor, root, expected in pairs:
        torch.testing.assert_close(root.T @ root, expected, rtol=1e-13, atol=1e-13)
        if root.shape[0] < root.shape[1]:  # wide: diagonalised through the root, never formed
            assert factor is None
        else:
            torch.testing.assert_close(factor, expected, rtol=1e-13, atol=1e-13)
    samples = torch.einsum("nto,nti->noi", grads, inputs)
    if positions == 1:
        samples_got = torch.einsum("no,ni->noi", kron.samples.output_grads, kron.samples.inputs)
    else:
        samples_got = kron.samples
    torch.testing.assert_close(samples_got, samples, rtol=1e-13, atol=1e-13)


# ------------------------------------------------------------------- torchvision models


def test_torchvision_resnet18_prepares_on_backpack():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    prepared = prepare(model, resolve_loss("cross_entropy"), "auto")
    try:
        assert prepared.backend == "backpack"
        assert not any("torch.func" in note for note in prepared.preparation_notes)
        assert len(prepared.layers) == 41
    finally:
        prepared.close()


@pytest.mark.slow
def test_torchvision_resnet18_measures_on_backpack():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    inputs, targets = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    m = measure(model, "cross_entropy", inputs, targets, structures=("diag", "block", "kron"))
    assert m.coverage[0]["backend"] == "backpack"
    assert all(entry["measured"] for entry in m.coverage)
    assert not any("sub-sampled" in note for note in m.notes)
    for structure in ("diag", "block", "kron"):
        assert f"{structure}/trace_ratio/all" in m.scalars
    assert "kron/trace_ratio/layer4.1.conv2" in m.scalars
