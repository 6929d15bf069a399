"""Diagonal statistics: float32 inputs, float64 sums, chunk boundaries, against dense float64."""

from __future__ import annotations

import pytest
import torch

import reference
from fisher_monitor.keys import DAMPED_METRICS, damping_suffix
from fisher_monitor.metrics import finalize
from fisher_monitor.structures.diag import statistics as diagonal_module
from fisher_monitor.structures.diag.statistics import diagonal_statistics

F64 = torch.float64


def diagonal_case(D=37, N=9, seed=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    per_sample = torch.randn(N, D, generator=g, dtype=F64)
    fisher = torch.rand(D, generator=g, dtype=F64)
    fisher[3] = 0.0  # an entry with zero Fisher
    empirical = per_sample.square().mean(0)
    return fisher.to(dtype), empirical.to(dtype), per_sample.mean(0).to(dtype), per_sample


def expected(fisher, empirical, per_sample, damping):
    """Dense float64 definitions on the diagonal matrices (of the very values passed in)."""
    D = fisher.numel()
    return reference.dense_metrics(
        torch.diag(fisher.to(F64)),
        torch.diag(empirical.to(F64)),
        per_sample,
        torch.full((D,), damping, dtype=F64),
    )


@pytest.mark.parametrize("chunk", [1, 5, 16, 1 << 15])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_diagonal_statistics_match_dense_diagonal_matrices(monkeypatch, chunk, dtype):
    """Any chunking and input type: float64 sums of the given values, to float64 rounding."""
    monkeypatch.setattr(diagonal_module, "DIAGONAL_CHUNK", chunk)
    fisher, empirical, gradient, per_sample = diagonal_case(dtype=dtype)
    # the reference uses the very gradient passed in (rounded to float32 where it was)
    per_sample = per_sample - per_sample.mean(0) + gradient.to(F64)
    dampings = [1e-6, 1e-2]
    stats = diagonal_statistics(fisher, empirical, gradient, dampings)
    assert stats.trace_f.dtype == F64
    got = finalize(stats, dampings)
    for damping in dampings:
        for key, value in expected(fisher, empirical, per_sample, damping).items():
            if key == "ef_projection_per_sample":  # uses the EF diagonal as given
                continue
            name = key + damping_suffix(damping, True) if key in DAMPED_METRICS else key
            assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-14), (name, chunk)
        per_sample_projection = float((empirical.to(F64) / (empirical.to(F64) + damping)).sum())
        assert got["ef_projection_per_sample" + damping_suffix(damping, True)] == pytest.approx(
            per_sample_projection, rel=1e-12
        )


def test_float32_inputs_are_summed_in_float64():
    """A sum that float32 accumulation gets wrong: 2²⁴ + many ones."""
    size = 1 << 16
    fisher = torch.ones(size, dtype=torch.float32)
    fisher[0] = 2.0**24
    empirical = torch.ones(size, dtype=torch.float32)
    gradient = torch.ones(size, dtype=torch.float32)
    stats = diagonal_statistics(fisher, empirical, gradient, [1.0])
    assert float(stats.trace_f) == 2.0**24 + size - 1


def test_empty_layer_and_workspace_reuse():
    stats = diagonal_statistics(torch.zeros(0), torch.zeros(0), torch.zeros(0), [0.1])
    assert stats.dimension == 0 and float(stats.trace_f) == 0.0
    fisher, empirical, gradient, _ = diagonal_case(D=200)
    diagonal_statistics(fisher, empirical, gradient, [0.1])
    first = diagonal_module._workspaces.buffer.data_ptr()
    diagonal_statistics(fisher, empirical, gradient, [0.1])
    assert diagonal_module._workspaces.buffer.data_ptr() == first
