"""The dense route by Cholesky, with the EF side through its N × N Gram, equals the eigh route."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fisher_monitor.structures.block.structure as block
from fisher_monitor import measure
from fisher_monitor.metrics import finalize
from fisher_monitor.structures.block.dense_route import (
    dense_statistics,
    factored_dense_statistics,
)
from fisher_monitor.structures.empirical import empirical_solves

F64 = torch.float64


@pytest.mark.parametrize("dampings", [[1e-3], [1e-6, 1e-2]])
def test_factored_dense_statistics_equal_the_eigendecompositions(dampings):
    g = torch.Generator().manual_seed(0)
    d, n, r = 30, 6, 40  # N < D ≤ R: the factored dense regime
    v = torch.randn(d, r, generator=g, dtype=F64)
    u = torch.randn(d, n, generator=g, dtype=F64) / n**0.5
    gradient = u.sum(dim=1) / n**0.5
    fisher, gram_u = v @ v.T, u.T @ u
    found = factored_dense_statistics(
        fisher, u, gradient, dampings, empirical_solves(gram_u, dampings, d), gram_u
    )
    assert found is not None
    statistics, natural = found
    expected = finalize(dense_statistics(fisher, u @ u.T, gradient, dampings), dampings)
    got = finalize(statistics, dampings)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    for nat, damping in zip(natural, dampings, strict=True):
        solved = torch.linalg.solve(fisher + damping * torch.eye(d, dtype=F64), gradient)
        torch.testing.assert_close(nat, solved, rtol=1e-10, atol=0)


def test_an_indefinite_block_falls_back_to_the_eigendecompositions():
    fisher = -torch.eye(4, dtype=F64)
    u = torch.ones(4, 2, dtype=F64)
    solves = empirical_solves(u.T @ u, [1e-3], 4)
    assert factored_dense_statistics(fisher, u, u[:, 0], [1e-3], solves, u.T @ u) is None


def test_a_small_output_layer_takes_the_factored_dense_route(monkeypatch):
    """``Linear(40, 6)``: D = 246 ≤ R = 5·64 = 320 and N = 64 < D."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 6)).double()
    inputs, targets = torch.randn(64, 40, dtype=F64), torch.randint(0, 6, (64,))
    calls = []
    original = block.factored_dense_statistics

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(block, "factored_dense_statistics", spy)
    monkeypatch.setattr(block, "_root_route", lambda *a, **k: None)
    args = dict(structures=("block",), keep_blocks=True, keep_directions=True)
    result = measure(model, nn.CrossEntropyLoss(), inputs, targets, **args)
    assert calls == [1]
    fisher_block, ef_block, g = result.blocks["0"]
    lam = result["block/damping/0"]
    expected = finalize(dense_statistics(fisher_block, ef_block, g, [lam]), [lam])
    for metric, value in expected.items():
        assert result[f"block/{metric}/0"] == pytest.approx(value, rel=1e-8, abs=1e-12), metric
    natural, empirical = result.directions["block"][0]["0"]
    eye = torch.eye(g.numel(), dtype=F64)
    torch.testing.assert_close(natural, torch.linalg.solve(fisher_block + lam * eye, g))
    torch.testing.assert_close(empirical, torch.linalg.solve(ef_block + lam * eye, g))
