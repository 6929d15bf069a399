"""The memory model against measured peaks, and what it counts (no R × R for a diagonal)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fisher_monitor.backends import prepare
from fisher_monitor.engine import cost, memory
from fisher_monitor.engine.profile import parameter_profile, profile
from fisher_monitor.factors import LayerShape, PassSize
from fisher_monitor.likelihoods import resolve_loss
from fisher_monitor.settings import MeasureSettings

HERE = Path(__file__).resolve().parent
#: The estimate must lie within this factor of the measured peak (it is meant to err high).
LOW, HIGH = 0.5, 3.0


def settings(structures, fisher="exact"):
    return MeasureSettings.create(structures, fisher, 1, 1e-3, "relative")


def peak(prepared, structures, network, samples, columns):
    """The memory model's estimate for the exact Fisher's pass with these structures."""
    size = PassSize(samples, columns, True, 1, network.itemsize)
    return memory.estimate_peak_bytes(
        prepared, cost.structures_for(structures, None), network, size
    )


def run_probe(*arguments: str) -> dict:
    completed = subprocess.run(
        [sys.executable, str(HERE / "memory_probe.py"), *arguments],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="peak memory is read from Linux's /proc"
)
@pytest.mark.parametrize(
    ("structures", "fisher"), [("diag", "exact"), ("diag,block", "exact"), ("kron", "exact")]
)
@pytest.mark.slow
def test_estimate_is_within_a_factor_of_the_measured_peak_on_a_small_cnn(structures, fisher):
    """A VGG-style CNN on 32 × 32 images, 32 samples (peaks of 70–230 MiB): measured in a
    fresh process as the rise of the resident-set high-water mark during the measurement."""
    result = run_probe("vgg", "32", structures, fisher, "auto")
    assert result["backend"] == "backpack"
    assert result["probe"] == 32 and not result["estimated_fisher"]
    assert result["measured"] > 2**24  # the measurement, not noise, dominates
    assert LOW <= result["estimate"] / result["measured"] <= HIGH, result


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    )


def test_profile_records_layer_shapes_from_one_forward_pass():
    prepared = prepare(cnn(), resolve_loss("cross_entropy"), "backpack")
    try:
        network = profile(prepared, torch.randn(5, 3, 16, 16))
        assert network.fisher_columns(prepared) == 9
        shapes = {layer.name: layer for layer in network.layers}
        assert shapes["0"] == LayerShape("0", "shared", 256, 28, 8, 224, 8 * 256, 2 * 224 * 256)
        assert shapes["3"] == LayerShape("3", "shared", 64, 73, 16, 1168, 16 * 64, 2 * 1168 * 64)
        assert shapes["6"] == LayerShape("6", "outer", 1, 1025, 10, 10250, 10, 2 * 10250)
        assert network.itemsize == 4 and network.sample_shape == (10,)
    finally:
        prepared.close()


def test_diagonal_estimate_has_no_gram_matrices():
    """With 1000 classes and 64 samples R = 63,936: a diagonal needs the R columns at each
    layer (about 2 GB here), no R × R matrix (33 GB); the block structure does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 1000))
    prepared = prepare(model, resolve_loss("cross_entropy"), "backpack")
    try:
        inputs = torch.randn(64, 20)
        network = profile(prepared, inputs)
        count = network.fisher_columns(prepared)
        assert count == 999
        diag = peak(prepared, ("diag",), network, 64, count)
        block = peak(prepared, ("diag", "block"), network, 64, count)
        gram = 8 * (64 * 999) ** 2
        assert diag < 4 * 2**30 < gram <= block
        # no quadratic term in N for the diagonal
        assert peak(prepared, ("diag",), network, 128, count) < 2.1 * diag
    finally:
        prepared.close()


def test_convolutions_are_not_counted_as_materialised_columns():
    """A wide convolution on the BackPACK backend counts its chunked or position-pair forms,
    not the R·N × D matrix ``V`` (which the torch.func backend does hold)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 256, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, 3),
        nn.Flatten(),
        nn.Linear(256, 10),
    )
    inputs = torch.randn(32, 3, 3, 3)  # the second convolution has a single position
    dimension = 256 * 256 * 9
    estimates = {}
    for backend in ("backpack", "functorch"):
        prepared = prepare(model, resolve_loss("cross_entropy"), backend)
        try:
            network = profile(prepared, inputs)
            estimates[backend] = peak(prepared, ("diag",), network, 32, 9)
        finally:
            prepared.close()
    columns = 4 * 9 * 32 * dimension  # V of the second convolution, float32
    assert estimates["backpack"] < columns / 4 < columns < estimates["functorch"]


def test_the_parameters_alone_underestimate_what_the_profile_knows():
    prepared = prepare(cnn(), resolve_loss("cross_entropy"), "backpack")
    try:
        fallback = peak(prepared, ("diag",), parameter_profile(prepared), 16, 9)
        network = profile(prepared, torch.randn(2, 3, 16, 16))
        profiled = peak(prepared, ("diag",), network, 16, 9)
        assert profile(prepared, torch.randn(7, 3, 16, 16)) is network  # cached per shape
        assert fallback < profiled  # the parameters alone do not know the positions
    finally:
        prepared.close()


def test_resnet18_on_cifar_images_is_not_sub_sampled():
    """torchvision's ResNet-18 on 32 × 32 images, 32 samples: well under a GiB estimated for
    the default measurement (the torch.func path held every pull-back: ~20 GiB)."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    prepared = prepare(model, resolve_loss("cross_entropy"), "auto")
    try:
        assert prepared.backend == "backpack"
        prepared.sync()  # BatchNorm in eval mode, as in a measurement
        network = profile(prepared, torch.randn(2, 3, 32, 32))
        assert peak(prepared, ("diag", "block"), network, 32, 9) < 2**30
    finally:
        prepared.close()


def test_sizes_in_messages_are_readable_at_every_scale():
    from fisher_monitor.validation import format_bytes

    assert format_bytes(1) == "1 byte"
    assert format_bytes(812) == "812 bytes"
    assert format_bytes(3 * 1024 + 205) == "3.2 KiB"
    assert format_bytes(1.5 * 2**20) == "1.5 MiB"
    assert format_bytes(2**31) == "2.0 GiB"
    assert format_bytes(3 * 2**40) == "3.0 TiB"


@pytest.mark.parametrize(
    ("structures", "fisher", "suggested", "not_suggested"),
    [
        (("diag", "block"), "exact", ["structures=('diag',)", "fisher='mc'"], []),
        (("diag",), "exact", ["fisher='mc'"], ["structures=('diag',)"]),
        (("diag",), "mc", ["sub-network"], ["structures=('diag',)", "fisher='mc'"]),
    ],
)
def test_one_sample_over_budget_suggests_only_what_would_change(
    structures, fisher, suggested, not_suggested
):
    """A budget of 1 byte reads "1 byte" (never "0.0 GiB"), and the advice never repeats
    the settings already in use."""
    with pytest.raises(MemoryError) as caught:
        memory.fitting_batch_size(lambda n: 5 * 2**20 * n, 8, 1, structures, fisher)
    text = str(caught.value)
    assert "memory budget of 1 byte" in text and "0.0 GiB" not in text
    assert "Even one probe sample needs an estimated 5.0 MiB" in text
    assert "raise memory_budget (now 1 byte)" in text
    for fix in suggested:
        assert fix in text
    for fix in not_suggested:
        assert fix not in text


def test_measure_with_a_diagonal_only_budget_error_does_not_suggest_the_diagonal():
    from fisher_monitor import measure

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    inputs, targets = torch.randn(16, 6), torch.randint(0, 3, (16,))
    with pytest.raises(MemoryError) as caught:
        measure(
            model, nn.CrossEntropyLoss(), inputs, targets, structures=("diag",), memory_budget=1
        )
    assert "1 byte" in str(caught.value) and "structures=('diag',)" not in str(caught.value)


class _SqueezedBatch(nn.Module):
    """A forward pass that fails on one sample, as ``x.squeeze()`` code does."""

    def __init__(self, strict: bool = True):
        super().__init__()
        self.strict = strict
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        if not self.strict:
            return self.body(x)
        hidden = self.body(x).squeeze()
        if hidden.dim() < 2:
            raise RuntimeError("Expected a batch of samples (the squeeze dropped it)")
        return hidden


def test_a_forward_that_fails_on_one_sample_is_still_measured():
    """The memory model's profile runs the first sample alone; a network that needs two
    samples is profiled on two, and its measurement equals the plain network's."""
    from fisher_monitor import measure

    torch.manual_seed(0)
    model = _SqueezedBatch()
    inputs, targets = torch.randn(16, 6), torch.randint(0, 3, (16,))
    with pytest.raises(RuntimeError, match="squeeze"):
        model(inputs[:1])
    found = measure(model, nn.CrossEntropyLoss(), inputs, targets, structures=("diag", "block"))
    plain = measure(
        model.body, nn.CrossEntropyLoss(), inputs, targets, structures=("diag", "block")
    )
    for key in ("block/direction_cosine/all", "diag/trace_ratio/all", "block/rel_error/all"):
        assert found[key] == pytest.approx(plain[key], rel=1e-6)
    # the profile of two samples counts one sample, as the plain network's does
    from fisher_monitor.engine.measurer import Measurer

    exact = MeasureSettings.create(("diag", "block"), "exact")
    loss = nn.CrossEntropyLoss()
    wrapped = Measurer(model, loss, exact, backend="autograd").estimate_peak_bytes(inputs)
    lenient = _SqueezedBatch(strict=False)
    lenient.load_state_dict(model.state_dict())
    assert wrapped == Measurer(lenient, loss, exact, backend="autograd").estimate_peak_bytes(inputs)
