"""The pure metric functions against dense computations on random factors (float64)."""

from __future__ import annotations

import pytest
import torch

import reference
from fisher_monitor.factors import OuterSamples
from fisher_monitor.metrics import finalize, sum_statistics
from fisher_monitor.structures.block.dense_route import dense_statistics
from fisher_monitor.structures.block.gram_route import lowrank_statistics
from fisher_monitor.structures.diag.statistics import diagonal_statistics
from fisher_monitor.structures.kron.statistics import kronecker_statistics


def dense_reference(F, per_sample, damping):
    """Metrics from dense F and per-sample gradients (rows), by definition (docs/theory.md#metrics)."""
    EF = per_sample.T @ per_sample / per_sample.shape[0]
    lam = torch.full((F.shape[0],), damping, dtype=F.dtype)
    return reference.dense_metrics(F, EF, per_sample, lam)


def compare(stats, expected, damping, rtol=1e-7):
    got = finalize(stats, [damping])
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=rtol, abs=1e-10), key


def random_factors(D, N, R, seed, rank_deficient=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(D, R, generator=g, dtype=torch.float64) * scale
    if rank_deficient:
        V[:, R // 2 :] = V[:, : R - R // 2] * 0.5  # repeated columns
    per_sample = torch.randn(N, D, generator=g, dtype=torch.float64) * scale
    return V, per_sample


@pytest.mark.parametrize("D, N, R", [(30, 5, 8), (12, 20, 6), (25, 7, 40)])
@pytest.mark.parametrize("damping", [1e-4, 0.3])
def test_lowrank_and_dense_statistics_match_the_definition(D, N, R, damping):
    V, per_sample = random_factors(D, N, R, seed=D + N + R)
    U = per_sample.T / N**0.5
    F = V @ V.T
    expected = dense_reference(F, per_sample, damping)
    lowrank = lowrank_statistics(U.T @ U, V.T @ V, U.T @ V, D, [damping])
    # with R > D the R × R system is singular up to λ and Woodbury loses digits to
    # cancellation; measure() takes the dense path there (D ≤ max(N, R))
    compare(lowrank, expected, damping, rtol=1e-7 if D > max(N, R) else 1e-4)
    dense = dense_statistics(F, per_sample.T @ per_sample / N, per_sample.mean(0), [damping])
    compare(dense, expected, damping)


def test_rank_deficient_and_badly_scaled_factors():
    for scale in (1e-4, 1e4):
        V, per_sample = random_factors(20, 6, 10, seed=1, rank_deficient=True, scale=scale)
        U = per_sample.T / 6**0.5
        damping = 1e-3 * float((V * V).sum()) / 20
        expected = dense_reference(V @ V.T, per_sample, damping)
        compare(
            lowrank_statistics(U.T @ U, V.T @ V, U.T @ V, 20, [damping]),
            expected,
            damping,
            rtol=1e-6,
        )


def test_diagonal_statistics_match_dense_diagonal_matrices():
    g = torch.Generator().manual_seed(3)
    per_sample = torch.randn(9, 15, generator=g, dtype=torch.float64)
    fisher = torch.rand(15, generator=g, dtype=torch.float64)
    fisher[3] = 0.0  # an entry with zero Fisher
    empirical = per_sample.square().mean(0)
    for damping in (1e-6, 1e-2):
        expected = reference.dense_metrics(
            torch.diag(fisher),
            torch.diag(empirical),
            per_sample,
            torch.full((15,), damping, dtype=torch.float64),
        )
        # the per-sample projection uses the diagonal EF: same as the dense definition with B diagonal
        compare(
            diagonal_statistics(fisher, empirical, per_sample.mean(0), [damping]), expected, damping
        )


@pytest.mark.parametrize("outer", [True, False])
@pytest.mark.parametrize("use_roots", [True, False])
def test_kronecker_statistics_match_dense_kronecker_products(outer, use_roots):
    g = torch.Generator().manual_seed(4)
    O, I, N, R = 4, 7, 5, 3  # N < I and R < O: the roots diagonalise through the smaller side
    X = torch.randn(N, I, generator=g, dtype=torch.float64) / N**0.5
    S = torch.randn(R, O, generator=g, dtype=torch.float64)
    A, G = X.T @ X, S.T @ S
    if outer:
        delta = torch.randn(N, O, generator=g, dtype=torch.float64)
        inputs = torch.randn(N, I, generator=g, dtype=torch.float64)
        samples = OuterSamples(delta, inputs)
        matrices = delta.unsqueeze(2) * inputs.unsqueeze(1)
    else:
        matrices = torch.randn(N, O, I, generator=g, dtype=torch.float64)
        samples = matrices
    per_sample = matrices.reshape(N, -1)
    U = per_sample.T / N**0.5
    damping = 0.05
    expected = dense_reference(torch.kron(G, A), per_sample, damping)
    roots = dict(input_root=X, output_root=S) if use_roots else {}
    stats = kronecker_statistics(A, G, samples, U.T @ U, [damping], **roots)
    compare(stats, expected, damping)


def test_statistics_add_up_over_layers():
    """``all`` is the block-diagonal whole, not an average: sums of statistics match it."""
    g = torch.Generator().manual_seed(5)
    blocks = []
    for D in (6, 9):
        V = torch.randn(D, 4, generator=g, dtype=torch.float64)
        per_sample = torch.randn(5, D, generator=g, dtype=torch.float64)
        blocks.append((V, per_sample))
    damping = 0.1
    stats = [
        lowrank_statistics(ps @ ps.T / 5, V.T @ V, ps @ V / 5**0.5, V.shape[0], [damping])
        for V, ps in blocks
    ]
    F = torch.block_diag(*(V @ V.T for V, _ in blocks))
    per_sample = torch.cat([ps for _, ps in blocks], dim=1)
    EF = torch.block_diag(*(ps.T @ ps / 5 for _, ps in blocks))
    lam = torch.full((15,), damping, dtype=torch.float64)
    expected = reference.dense_metrics(F, EF, per_sample, lam)
    compare(sum_statistics(stats), expected, damping)


def test_inverse_square_norm_by_blocks_equals_the_direct_inverse():
    from fisher_monitor.linalg import inverse_square_norm

    g = torch.Generator().manual_seed(6)
    for k in (5, 130, 301):
        root = torch.randn(k, k + 3, generator=g, dtype=torch.float64)
        lower = torch.linalg.cholesky(root @ root.T + 1e-2 * torch.eye(k, dtype=torch.float64))
        direct = torch.linalg.inv(lower).square().sum()
        assert float(inverse_square_norm(lower, base=16)) == pytest.approx(float(direct), rel=1e-9)
