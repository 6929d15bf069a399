"""Dense-block statistics against the 60-digit definition, and the root route in their regime."""

from __future__ import annotations

import pytest
import torch

from fisher_monitor.metrics import finalize
from fisher_monitor.structures.block.dense_route import dense_statistics
from fisher_monitor.structures.block.root_route import outer_product_roots, root_block_statistics
from highprecision import COMPARED, COSINES, dense_metrics, softmax_head

F64 = torch.float64


def small_head(scale: float, seed: int = 0):
    """Linear(3, 4) with cross-entropy on 8 samples: D = 16 ≤ R = 24 (the dense regime)."""
    g = torch.Generator().manual_seed(seed)
    return softmax_head(
        scale * torch.randn(8, 3, generator=g, dtype=F64),
        torch.randn(4, 3, generator=g, dtype=F64),
        torch.randn(4, generator=g, dtype=F64),
        torch.randint(0, 4, (8,), generator=g),
    )


def compare(got, expected, tolerance):
    for key in COMPARED:
        error = abs(got[key] - expected[key])
        if key not in COSINES:
            error /= abs(expected[key])
        assert error <= tolerance, (key, got[key], expected[key])


@pytest.mark.parametrize("damping", [1e-2, 1e-8])
def test_dense_statistics_match_high_precision(damping):
    h = small_head(scale=1.0)
    v, u = h.factors()
    n = h.num_samples
    stats = dense_statistics(v @ v.T, u @ u.T, u.sum(dim=1) / n**0.5, [damping])
    compare(finalize(stats, [damping]), dense_metrics(v, u, damping), 1e-8)


def test_per_sample_projection_stays_below_the_rank_at_tiny_damping():
    """Rounding-level eigenvalues of a rank-deficient EF are zeroed, not counted as curvature."""
    h = small_head(scale=1.0)
    v, u = h.factors()
    n = h.num_samples
    rank = int(torch.linalg.matrix_rank(u))
    values = finalize(dense_statistics(v @ v.T, u @ u.T, u.sum(dim=1) / n**0.5, [1e-14]), [1e-14])
    assert values["ef_projection_per_sample"] <= rank + 1e-6


def test_root_route_keeps_scale_separated_curvature_the_dense_blocks_lose():
    """Inputs 1e-8 times the bias' constant: F's weight part is 1e-16 of its bias part.

    Formed as a D × D matrix it is below rounding; the factors keep it. At a damping below
    it, the root route is right where the dense path is not.
    """
    h = small_head(scale=1e-8)
    v, u = h.factors()
    damping = 1e-20
    expected = dense_metrics(v, u, damping)
    root = root_block_statistics(
        outer_product_roots(h.inputs, h.scaled_sqrt())[0],
        h.dimension,
        [damping],
        coefficients=h.coefficients(),
    )
    compare(finalize(root.statistics, [damping]), expected, 1e-6)
    n = h.num_samples
    dense = finalize(
        dense_statistics(v @ v.T, u @ u.T, u.sum(dim=1) / n**0.5, [damping]), [damping]
    )
    assert abs(dense["direction_cosine"] - expected["direction_cosine"]) > 0.1
    assert dense["nat_projection"] > 10 * expected["nat_projection"]
