"""Block metrics stay right when curvature spans many orders of magnitude inside a layer.

A ``Linear`` + cross-entropy head whose inputs are tiny (bias and weight curvatures 1e8 or
1e16 apart), near-duplicate samples, and a MobileNet-like head (``Linear(1024, 5)`` on
nearly identical inputs): ``measure()`` on both backends against the 60-digit reference of
``tests/metrics/highprecision.py`` (computed from the exact factors, basis-free), to 1e-6
at the default relative damping and 1e-3 at 1e-9 relative (cosines compared absolutely).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fisher_monitor import measure
from highprecision import COMPARED, COSINES, softmax_head, subspace_metrics

F64 = torch.float64
CASES = {
    "inputs x1e-4": dict(width=12, scale=1e-4),
    "inputs x1e-8": dict(width=12, scale=1e-8),
    "near duplicates": dict(width=12, duplicates=1e-7),
    "mobilenet-like head": dict(width=1024, spread=1e-6),
}
TOLERANCE = {1e-3: 1e-6, 1e-9: 1e-3}


def head_problem(spec: dict, samples: int = 8, classes: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    width = spec["width"]
    if "spread" in spec:
        mean = torch.rand(width, generator=g, dtype=F64)
        x = mean + spec["spread"] * torch.randn(samples, width, generator=g, dtype=F64)
    elif "duplicates" in spec:
        base = torch.randn(samples // 2, width, generator=g, dtype=F64)
        x = torch.cat(
            [base, base + spec["duplicates"] * torch.randn(base.shape, generator=g, dtype=F64)]
        )
    else:
        x = spec["scale"] * torch.randn(samples, width, generator=g, dtype=F64)
    layer = nn.Linear(width, classes).double()
    with torch.no_grad():
        layer.weight.copy_(
            (2 * torch.rand(classes, width, generator=g, dtype=F64) - 1) / width**0.5
        )
        layer.bias.copy_((2 * torch.rand(classes, generator=g, dtype=F64) - 1) / width**0.5)
    y = torch.randint(0, classes, (samples,), generator=g)
    if "duplicates" in spec:
        y = torch.cat([y[: samples // 2], y[: samples // 2]])
    return layer, x, y


@pytest.mark.slow
@pytest.mark.parametrize("relative", [1e-3, 1e-9])
@pytest.mark.parametrize("case", list(CASES))
def test_both_backends_match_high_precision(case, relative):
    layer, x, y = head_problem(CASES[case])
    head = softmax_head(x, layer.weight.detach(), layer.bias.detach(), y)
    damping = relative * float(torch.trace(head.gram_v())) / head.dimension
    expected = subspace_metrics(head.exact_grams(True), damping)
    results = {}
    for backend in ("backpack", "functorch"):
        m = measure(
            layer,
            nn.CrossEntropyLoss(),
            x,
            y,
            structures=("block",),
            backend=backend,
            damping=damping,
            damping_mode="absolute",
        )
        results[backend] = m
        for metric in COMPARED:
            got, want = m[f"block/{metric}/all"], expected[metric]
            error = abs(got - want) if metric in COSINES else abs(got - want) / abs(want)
            assert error <= TOLERANCE[relative], (backend, metric, got, want)
    for key, value in results["backpack"].scalars.items():
        if key.startswith("block/") and key.split("/")[1] in COSINES:
            assert results["functorch"][key] == pytest.approx(value, abs=TOLERANCE[relative]), key


def test_a_layer_the_gram_route_leaves_out_of_range_is_redone_by_its_root_route():
    """Inputs near 2e-10 beside the bias' ones, 32 samples of 10 classes (``R = 288``: the
    Gram route, its rounding probed by a rerun): ``x̃ᵀx̃' = 1 + 4e-18`` keeps no digit of the
    inputs, and the Gram route's ``nat_grad_cosine`` read 1.00007, beyond its rounding
    estimate, so the measurement failed (MobileNetV3's classifier at initialisation, one
    random batch in three). A layer whose statistics leave a metric's range is redone by
    its root route: the metrics equal the dense float64 definition."""
    import reference

    torch.manual_seed(5)
    network = nn.Sequential(nn.Linear(100, 10))
    nn.init.normal_(network[0].weight, 0.0, 0.01)
    nn.init.zeros_(network[0].bias)
    x = torch.randn(32, 100).abs() * 2e-10
    y = torch.randint(0, 10, (32,))
    network, x = network.double(), x.double()
    loss = nn.CrossEntropyLoss()
    got = measure(network, loss, x, y, structures=("block",)).scalars
    expected = reference.diag_and_block_metrics(network, loss, x, y)
    for metric in ("nat_grad_cosine", "ef_grad_cosine", "direction_cosine", "matrix_cosine"):
        key = f"block/{metric}/0"
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key
    for metric in ("nat_projection", "ef_projection", "kl"):
        key = f"block/{metric}/0"
        assert got[key] == pytest.approx(expected[key], rel=1e-6), key
