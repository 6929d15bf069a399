"""Mixed precision on the Gram route: float32 factorisation, float64 refinement, same numbers.

A ``Linear`` layer with at least 256 Fisher columns takes the Gram route in float32 with
float64-refined solves where the rounding estimate allows: every metric equals the float64
route's (and the dense float64 definition) to the reference suite's tolerances; where the
estimate refuses float32 (a tiny damping) the layer is redone in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fisher_monitor.structures.block.mixed as mixed
from fisher_monitor import measure
from fisher_monitor.linalg import factor_damped_gram, inverse_cholesky_factor, triangular_inverse

F64 = torch.float64


def problem(seed: int = 0, samples: int = 40, duplicates: bool = False):
    """``Linear(48, 10)`` on 40 samples: R = 360 Fisher columns, D = 490 (the Gram route).

    With ``duplicates``, the second half of the samples repeats the first (same labels):
    ``K_V`` is singular, and a tiny damping is below float32's resolution.
    """
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(48, 10))
    inputs = torch.randn(samples, 48)
    targets = torch.randint(0, 10, (samples,))
    if duplicates:
        half = samples // 2
        inputs[half:], targets[half:] = inputs[:half], targets[:half]
    return model, inputs, targets


def both(monkeypatch, damping=1e-3, duplicates=False, **kwargs):
    model, inputs, targets = problem(duplicates=duplicates)
    args = dict(structures=("block",), damping=damping, keep_directions=True, **kwargs)
    fast = measure(model, nn.CrossEntropyLoss(), inputs, targets, **args)
    monkeypatch.setattr(mixed, "ENABLED", False)
    slow = measure(model, nn.CrossEntropyLoss(), inputs, targets, **args)
    return fast, slow


def spy_on_attempts(monkeypatch) -> list:
    """The float32 attempts' results (``None``: refused), in order, as they happen."""
    seen = []
    original = mixed._attempt

    def spy(layer, factors, workspace):
        result = original(layer, factors, workspace)
        seen.append(result)
        return result

    monkeypatch.setattr(mixed, "_attempt", spy)
    return seen


def test_float32_factorisation_with_refinement_gives_the_float64_numbers(monkeypatch):
    seen = spy_on_attempts(monkeypatch)
    fast, slow = both(monkeypatch)
    assert seen and seen[0] is not None and seen[0].health.route == "gram-float32"
    for key, value in slow.scalars.items():
        if key == "probe/seconds":
            continue
        if key.split("/")[1] in ("direction_cosine", "nat_grad_cosine", "ef_grad_cosine"):
            assert fast[key] == pytest.approx(value, abs=1e-9), key  # refined in float64
        else:  # ‖F‖²_F and the KL keep the float32 factor's rounding, bounded at 1e-4
            assert fast[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    for (nat, ef), (nat64, ef64) in zip(
        fast.directions["block"][0].values(), slow.directions["block"][0].values(), strict=True
    ):
        torch.testing.assert_close(nat, nat64, rtol=1e-9, atol=0)
        torch.testing.assert_close(ef, ef64, rtol=1e-12, atol=0)


def test_a_damping_below_float32_resolution_is_redone_in_float64(monkeypatch):
    attempts = spy_on_attempts(monkeypatch)
    fast, slow = both(monkeypatch, damping=1e-12, duplicates=True)
    assert attempts == [None]  # refused: the float64 route measured the layer
    for key, value in slow.scalars.items():
        if key != "probe/seconds":
            assert fast[key] == value, key


def test_a_refused_layer_goes_to_float64_directly_for_a_while():
    model, inputs, targets = problem(duplicates=True)
    from fisher_monitor.engine import Measurer
    from fisher_monitor.settings import MeasureSettings

    measurer = Measurer(
        model, nn.CrossEntropyLoss(), MeasureSettings.create(("block",), damping=1e-12)
    )
    measurer(inputs, targets)
    refused = measurer.workspace.memory["float32 refused"]
    assert refused == {"0": mixed.RETRY_AFTER}
    measurer(inputs, targets)
    assert refused == {"0": mixed.RETRY_AFTER - 1}
    measurer.close()


def test_repeated_measurements_reuse_the_workspace_and_agree_to_the_bit():
    model, inputs, targets = problem()
    from fisher_monitor.engine import Measurer
    from fisher_monitor.settings import MeasureSettings

    measurer = Measurer(model, nn.CrossEntropyLoss(), MeasureSettings.create(("diag", "block")))
    first = measurer(inputs, targets, generator=torch.Generator().manual_seed(0))
    pointers = {key: b.data_ptr() for key, b in measurer.workspace._buffers.items()}
    held = measurer.workspace.bytes
    second = measurer(inputs, targets, generator=torch.Generator().manual_seed(0))
    assert {key: b.data_ptr() for key, b in measurer.workspace._buffers.items()} == pointers
    assert measurer.workspace.bytes == held > 360 * 360 * 4
    for key, value in first.scalars.items():
        if key != "probe/seconds":
            assert second[key] == value, key
    measurer.close()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("size", [7, 96, 97, 300])
def test_triangular_inverse_and_the_inverse_cholesky_factor(dtype, size):
    g = torch.Generator().manual_seed(size)
    root = torch.randn(size, size + 5, generator=g, dtype=F64)
    gram = (root @ root.T).to(dtype)
    lower = torch.linalg.cholesky(gram.to(F64) + torch.eye(size, dtype=F64)).to(dtype)
    out = torch.empty_like(lower)
    expected = torch.linalg.inv(lower.to(F64))
    tolerance = 1e-4 if dtype == torch.float32 else 1e-10
    assert (triangular_inverse(lower, out).to(F64) - expected).abs().max() <= tolerance
    assert bool((out.triu(1) == 0).all())
    kept = gram.clone()
    factor = inverse_cholesky_factor(gram, 1.0)
    assert torch.equal(gram, kept)  # factorised in a workspace copy
    shifted = gram.to(F64) + torch.eye(size, dtype=F64)
    inverse = torch.linalg.inv(shifted)
    dense_lower = torch.linalg.cholesky(shifted)
    relative_lower = (factor.lower.to(F64) - dense_lower).norm() / dense_lower.norm()
    assert float(relative_lower) <= tolerance
    assert bool((factor.lower.triu(1) == 0).all())
    rhs = torch.randn(size, 2, generator=g, dtype=F64)
    solved, expected_solve = factor.solve(rhs), inverse @ rhs
    assert float((solved - expected_solve).norm() / expected_solve.norm()) <= tolerance
    torch.testing.assert_close(factor.trace_inverse(), inverse.trace(), rtol=tolerance, atol=0)
    torch.testing.assert_close(
        factor.inverse_diagonal(), inverse.diagonal(), rtol=tolerance * 10, atol=0
    )
    assert float(factor.logdet_ratio) == pytest.approx(float(torch.logdet(shifted)), rel=tolerance)
    assert inverse_cholesky_factor(-torch.eye(3, dtype=dtype), 0.5) is None


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(("size", "base"), [(97, 16), (577, 384), (800, 100)])
def test_the_recursive_triangular_inverse_with_its_scratch(dtype, size, base):
    """Odd and even splits down to solved diagonal blocks in the scratch (given or not)."""
    g = torch.Generator().manual_seed(size)
    root = torch.randn(size, size + 5, generator=g, dtype=F64)
    lower = torch.linalg.cholesky(root @ root.T + torch.eye(size, dtype=F64))
    expected = torch.linalg.inv(lower)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-10
    scratch = torch.full((((size + 1) // 2) ** 2,), float("nan"), dtype=dtype)
    for given in (scratch, None):
        out = torch.full((size, size), float("nan"), dtype=dtype)
        triangular_inverse(lower.to(dtype), out, given, base=base)
        relative_error = (out.to(F64) - expected).norm() / expected.norm()
        assert float(relative_error) <= tolerance
        assert bool((out.triu(1) == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("size", [5, 64])
def test_the_damped_gram_factor_in_a_reused_buffer(dtype, size):
    g = torch.Generator().manual_seed(size)
    root = torch.randn(size, size // 2, generator=g, dtype=F64)  # rank-deficient K
    gram = (root @ root.T).to(dtype)
    kept, buffer = gram.clone(), torch.empty_like(gram)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-10
    for damping in (1e-1, 1.0):  # the buffer serves both dampings in turn
        factor = factor_damped_gram(gram, damping, buffer)
        shifted = gram.to(F64) + damping * torch.eye(size, dtype=F64)
        dense_lower = torch.linalg.cholesky(shifted)
        relative_lower = (factor.cholesky.to(F64) - dense_lower).norm() / dense_lower.norm()
        assert float(relative_lower) <= tolerance
        assert bool((factor.cholesky.triu(1) == 0).all())
        expected = torch.logdet(shifted) - size * math.log(damping)
        assert float(factor.logdet_ratio) == pytest.approx(float(expected), rel=tolerance)
        assert float(factor.trace_inverse) == pytest.approx(
            float(torch.linalg.inv(shifted).trace()), rel=tolerance
        )
    assert torch.equal(gram, kept)


def test_tiny_gradients_keep_their_digits_in_float32(monkeypatch):
    """Gradients near 1e-12 (MobileNetV3's depthwise convolutions at initialisation reach
    1e-10): ``K_V``'s entries near 1e-24 square to 1e-48, below float32's range, so
    ``‖K_V‖²_F`` read zero and the matrix cosine came out above one (2.2 on MobileNetV3).
    The squares are taken on entries scaled by a power of two: with ``K_V`` in float32, the
    metrics equal the dense float64 definition."""
    import reference

    model, inputs, targets = problem()
    head = nn.Linear(10, 10, bias=False)
    head.weight.data = 1e-12 * torch.eye(10)
    head.weight.requires_grad_(False)
    network = nn.Sequential(model[0], head).double()
    inputs = inputs.double()
    seen = spy_on_attempts(monkeypatch)
    loss = nn.CrossEntropyLoss()
    got = measure(network, loss, inputs, targets, structures=("block",)).scalars
    assert seen and seen[0] is not None and seen[0].health.route == "gram-float32"
    expected = reference.diag_and_block_metrics(network, loss, inputs, targets)
    for metric in ("matrix_cosine", "rel_error", "trace_ratio", "kl", "direction_cosine"):
        key = f"block/{metric}/0"
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key
