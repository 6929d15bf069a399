"""Kronecker-factored statistics against dense Kronecker products (float64)."""

from __future__ import annotations

import pytest
import torch

import reference
from fisher_monitor.factors import OuterSamples
from fisher_monitor.linalg import SINGLE_THREAD_EIGH_MAX, symmetric_eigh
from fisher_monitor.metrics import finalize
from fisher_monitor.structures.block.gram_route import lowrank_statistics
from fisher_monitor.structures.empirical import empirical_solves
from fisher_monitor.structures.kron.statistics import factor_basis, kronecker_statistics

F64 = torch.float64


def layer(O, I, N, R, seed, outer=True):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, I, generator=g, dtype=F64) / N**0.5  # input root: A = XᵀX
    S = torch.randn(R, O, generator=g, dtype=F64)  # output root: G = SᵀS
    if outer:
        delta = torch.randn(N, O, generator=g, dtype=F64)
        inputs = torch.randn(N, I, generator=g, dtype=F64)
        samples = OuterSamples(delta, inputs)
        matrices = delta.unsqueeze(2) * inputs.unsqueeze(1)
    else:
        matrices = torch.randn(N, O, I, generator=g, dtype=F64)
        samples = matrices
    per_sample = matrices.reshape(N, -1)
    return X, S, samples, per_sample


def expected_metrics(X, S, per_sample, damping):
    F = torch.kron(S.T @ S, X.T @ X)
    EF = per_sample.T @ per_sample / per_sample.shape[0]
    lam = torch.full((F.shape[0],), damping, dtype=F64)
    return reference.dense_metrics(F, EF, per_sample, lam)


@pytest.mark.parametrize("outer", [True, False])
@pytest.mark.parametrize("O, I, N, R", [(4, 7, 5, 3), (6, 3, 4, 9)])
def test_roots_alone_give_the_same_statistics_as_the_factors(outer, O, I, N, R):
    """With the factors left out (``None``) nothing changes: wide and tall roots alike."""
    X, S, samples, per_sample = layer(O, I, N, R, seed=O + I, outer=outer)
    gram_u = per_sample @ per_sample.T / N
    damping = 0.05
    expected = expected_metrics(X, S, per_sample, damping)
    for factors in ((X.T @ X, S.T @ S), (None, None), (X.T @ X, None), (None, S.T @ S)):
        stats = kronecker_statistics(
            *factors, samples, gram_u, [damping], input_root=X, output_root=S
        )
        got = finalize(stats, [damping])
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-7, abs=1e-10), (key, factors)


def test_a_missing_factor_needs_its_root():
    X, S, samples, per_sample = layer(3, 4, 5, 2, seed=0)
    with pytest.raises(ValueError, match="factor or its root"):
        kronecker_statistics(None, S.T @ S, samples, per_sample @ per_sample.T / 5, [0.1])
    with pytest.raises(ValueError, match="factor or its root"):
        factor_basis(None, None)


def test_shared_empirical_solves_match_and_are_checked():
    """Block and kron can share one EF-side solve per damping (same U)."""
    O, I, N, R = 5, 8, 6, 4
    X, S, samples, per_sample = layer(O, I, N, R, seed=3)
    gram_u = per_sample @ per_sample.T / N
    dampings = [1e-3, 0.1]
    solves = empirical_solves(gram_u, dampings, O * I)
    shared = finalize(
        kronecker_statistics(
            None, None, samples, gram_u, dampings, input_root=X, output_root=S, empirical=solves
        ),
        dampings,
    )
    alone = finalize(
        kronecker_statistics(None, None, samples, gram_u, dampings, input_root=X, output_root=S),
        dampings,
    )
    assert shared == pytest.approx(alone, rel=1e-12)
    # the block structure's EF-side numbers are the same objects' numbers
    V = torch.randn(O * I, 7, dtype=F64)
    U = per_sample.T / N**0.5
    block = finalize(
        lowrank_statistics(gram_u, V.T @ V, U.T @ V, O * I, dampings, empirical=solves), dampings
    )
    for key in ("ef_projection", "ef_projection_per_sample"):
        for damping in dampings:
            suffixed = f"{key}@{damping!r}"
            assert block[suffixed] == pytest.approx(shared[suffixed], rel=1e-12)
    with pytest.raises(ValueError, match="one per damping"):
        kronecker_statistics(
            None, None, samples, gram_u, dampings, input_root=X, output_root=S, empirical=solves[:1]
        )


def test_wide_root_basis_is_orthonormal_and_diagonalises_the_factor():
    g = torch.Generator().manual_seed(8)
    root = torch.randn(6, 40, generator=g, dtype=F64)
    root[5] = root[4] * 1e-9 + root[3]  # nearly dependent rows
    basis = factor_basis(None, root)
    assert not basis.complete
    q = basis.vectors
    torch.testing.assert_close(q.T @ q, torch.eye(q.shape[1], dtype=F64), rtol=0, atol=1e-12)
    factor = root.T @ root
    torch.testing.assert_close(q.T @ factor @ q, torch.diag(basis.eigenvalues), rtol=0, atol=1e-9)
    # the basis spans the factor's range
    residual = factor - q @ (q.T @ factor)
    assert float(residual.abs().max()) < 1e-9 * float(factor.abs().max())


def test_symmetric_eigh_restores_the_thread_setting():
    threads = torch.get_num_threads()
    small = torch.eye(SINGLE_THREAD_EIGH_MAX, dtype=F64) * 2.0
    values, _ = symmetric_eigh(small)
    assert torch.get_num_threads() == threads
    torch.testing.assert_close(values, torch.full_like(values, 2.0))
