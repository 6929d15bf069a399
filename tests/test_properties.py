"""Property-based tests (hypothesis) of the metric functions on random low-rank factors.

Rank-deficient and badly scaled factors included: no NaN, cosines in [−1, 1], KL ≥ 0,
the per-sample projection at most rank EF, gᵀẼF⁻¹g ≤ 1, and agreement with the dense path.
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fisher_monitor.factors import OuterSamples
from fisher_monitor.metrics import finalize
from fisher_monitor.structures.block.dense_route import dense_statistics
from fisher_monitor.structures.block.gram_route import lowrank_statistics
from fisher_monitor.structures.diag.statistics import diagonal_statistics
from fisher_monitor.structures.kron.statistics import kronecker_statistics

COSINES = ("direction_cosine", "nat_grad_cosine", "ef_grad_cosine", "matrix_cosine")


@st.composite
def factors(draw):
    D = draw(st.integers(2, 24))
    N = draw(st.integers(1, 10))
    R = draw(st.integers(1, 12))
    rank = draw(st.integers(1, min(N, R, D)))
    log_scale = draw(st.floats(-6, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    damping = draw(st.floats(1e-8, 10.0))
    g = torch.Generator().manual_seed(seed)
    scale = 10.0**log_scale
    # rank-deficient: both factors built from `rank` directions plus exact repeats
    basis = torch.randn(D, rank, generator=g, dtype=torch.float64)
    V = basis @ torch.randn(rank, R, generator=g, dtype=torch.float64) * scale
    per_sample = (basis @ torch.randn(rank, N, generator=g, dtype=torch.float64)).T * scale
    return D, N, R, V, per_sample, damping * scale**2


def check(values: dict[str, float], rank: int, projection_bound: float = 1.0):
    """``projection_bound``: gᵀẼF⁻¹g ≤ 1 for the full EF; ≤ rank for its diagonal."""
    for key, value in values.items():
        assert not math.isnan(value), key
    for key in COSINES:
        assert -1.0 <= values[key] <= 1.0, key
    assert values["kl"] >= 0.0
    assert values["ef_projection_per_sample"] <= rank + 1e-6 * max(1.0, rank)
    assert -1e-12 <= values["ef_projection"] <= projection_bound * (1 + 1e-9)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(factors())
def test_lowrank_and_dense_metrics_are_well_behaved(case):
    D, N, R, V, per_sample, damping = case
    U = per_sample.T / N**0.5
    rank_ef = int(torch.linalg.matrix_rank(per_sample))
    dense = finalize(
        dense_statistics(V @ V.T, per_sample.T @ per_sample / N, per_sample.mean(0), [damping]),
        [damping],
    )
    check(dense, rank_ef)
    lowrank = finalize(lowrank_statistics(U.T @ U, V.T @ V, U.T @ V, D, [damping]), [damping])
    check(lowrank, rank_ef)
    if D > max(N, R):  # where measure() uses the low-rank path, both paths agree
        for key in ("trace_ratio", "rel_error", "matrix_cosine", "ef_projection_per_sample"):
            assert math.isclose(lowrank[key], dense[key], rel_tol=1e-6, abs_tol=1e-9), key


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(6, 30),
    st.integers(1, 6),
    st.integers(1, 4),
    st.floats(-6, 6),
    st.floats(1e-8, 10.0),
    st.integers(0, 2**31 - 1),
)
def test_coefficient_path_is_well_behaved_and_matches_dense(
    D, N, per_sample_columns, log_scale, damping, seed
):
    """The exact-Fisher route U = VB, in the regime measure() uses it (D > R = R_n·N).

    V has full column rank; B is block-sparse like the real one (sample n's gradient is a
    combination of sample n's own columns).
    """
    R = per_sample_columns * N
    if D <= max(N, R):
        return
    g = torch.Generator().manual_seed(seed)
    scale = 10.0**log_scale
    V = torch.randn(D, R, generator=g, dtype=torch.float64) * scale
    beta = torch.randn(N, per_sample_columns, generator=g, dtype=torch.float64)
    B = torch.zeros(per_sample_columns, N, N, dtype=torch.float64)
    B[:, torch.arange(N), torch.arange(N)] = beta.T
    B = B.reshape(R, N)
    U = V @ B
    per_sample = U.T * N**0.5
    K = V.T @ V
    lam = damping * scale**2
    values = finalize(lowrank_statistics(B.T @ K @ B, K, B.T @ K, D, [lam], coefficients=B), [lam])
    check(values, int(torch.linalg.matrix_rank(per_sample)))
    dense = finalize(dense_statistics(V @ V.T, U @ U.T, per_sample.mean(0), [lam]), [lam])
    # both routes are backward stable; their difference is bounded by the conditioning
    # of A = F + λI: tolerance κ(A)·1e-13 (at least 1e-7)
    condition = float(torch.linalg.eigvalsh(K).max() + lam) / lam
    tolerance = max(1e-7, 1e-13 * condition)
    for key in ("direction_cosine", "nat_grad_cosine", "ef_grad_cosine", "nat_projection"):
        assert math.isclose(values[key], dense[key], rel_tol=tolerance, abs_tol=1e-9), key
    # the KL is a difference of terms of size O(D): its error is absolute, D·tolerance
    assert math.isclose(values["kl"], dense["kl"], rel_tol=tolerance, abs_tol=D * tolerance)


@settings(max_examples=60, deadline=None)
@given(factors())
def test_diagonal_metrics_are_well_behaved(case):
    D, N, R, V, per_sample, damping = case
    fisher = V.square().sum(dim=1)
    empirical = per_sample.square().mean(dim=0)
    values = finalize(
        diagonal_statistics(fisher, empirical, per_sample.mean(0), [damping]), [damping]
    )
    nonzero = int((empirical > 0).sum())
    check(values, nonzero, projection_bound=nonzero)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 6),
    st.integers(1, 8),
    st.integers(0, 2**31 - 1),
    st.floats(1e-6, 1.0),
)
def test_kronecker_metrics_are_well_behaved(O, I, N, seed, damping):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, I, generator=g, dtype=torch.float64)
    S = torch.randn(max(1, N - 1), O, generator=g, dtype=torch.float64)
    delta = torch.randn(N, O, generator=g, dtype=torch.float64)
    per_sample = (delta.unsqueeze(2) * X.unsqueeze(1)).reshape(N, -1)
    U = per_sample.T / N**0.5
    A, G = X.T @ X / N, S.T @ S
    values = finalize(
        kronecker_statistics(
            A, G, OuterSamples(delta, X), U.T @ U, [damping], input_root=X / N**0.5, output_root=S
        ),
        [damping],
    )
    check(values, int(torch.linalg.matrix_rank(per_sample)))
