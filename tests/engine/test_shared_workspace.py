"""One-shot ``measure()`` keeps a thread's small buffers for its next call, and only them."""

from __future__ import annotations

import threading

import torch
from torch import nn

from fisher_monitor import linalg, measure


def problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (16,), generator=g)
    return x, y


def network():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()


def test_buffers_are_kept_between_calls_and_results_are_not_shared(monkeypatch):
    """The second call reuses the first's buffers; what the first returned is untouched."""
    monkeypatch.setattr(linalg, "_SHARED", threading.local())
    model, loss = network(), nn.CrossEntropyLoss()
    first = measure(model, loss, *problem(0), keep_directions=True)
    kept = dict(linalg._SHARED.buffers)
    assert kept  # the fused diagonals and the Gram route took buffers

    def copies(measurement):
        return {
            (structure, index, layer): tuple(t.clone() for t in pair)
            for structure, per_damping in measurement.directions.items()
            for index, layers in enumerate(per_damping)
            for layer, pair in layers.items()
        }

    directions = copies(first)
    assert directions
    scalars = dict(first.scalars)
    second = measure(model, loss, *problem(1), keep_directions=True)
    assert all(linalg._SHARED.buffers[key] is buffer for key, buffer in kept.items())
    assert second.scalars["block/direction_cosine/all"] != scalars["block/direction_cosine/all"]
    assert first.scalars == scalars
    for (structure, index, layer), saved in directions.items():
        pair = first.directions[structure][index][layer]
        assert all(torch.equal(t, c) for t, c in zip(pair, saved, strict=True))
    again = measure(model, loss, *problem(0), keep_directions=True)
    timeless = [{k: v for k, v in m.scalars.items() if "seconds" not in k} for m in (first, again)]
    assert timeless[0] == timeless[1]  # reused buffers give the same numbers


def test_buffers_above_the_limit_are_released(monkeypatch):
    monkeypatch.setattr(linalg, "_SHARED", threading.local())
    monkeypatch.setattr(linalg, "SHARED_WORKSPACE_BYTES", 16)
    measure(network(), nn.CrossEntropyLoss(), *problem(0))
    assert linalg._SHARED.buffers == {}
