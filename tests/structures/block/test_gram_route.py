"""Block statistics from low-rank factors against high-precision and dense references.

Scale separation inside one block (a ``Linear`` layer whose inputs are 1e-4 or 1e-8 times
its bias' constant input, near-duplicate samples, a MobileNet-like head on nearly
identical inputs) is checked against 60-digit arithmetic on the same float64 factors:
the root route must be right to 1e-6 at the default damping and 1e-3 at ``λ = 1e-9 ·
tr F/D``, with and without coefficients; the Gram route must either be that right or say
in its health estimate that it may not be.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fisher_monitor.keys import DAMPED_METRICS, damping_suffix
from fisher_monitor.metrics import finalize
from fisher_monitor.structures.block.gram_route import (
    SPECTRAL_MIN_DAMPINGS,
    gram_block_statistics,
    lowrank_statistics,
)
from fisher_monitor.structures.block.root_route import (
    joint_basis_block_statistics,
    outer_product_roots,
    prefer_root_route,
    root_block_statistics,
)
from fisher_monitor.structures.empirical import empirical_solve, empirical_solves
from highprecision import (
    COMPARED,
    COSINES,
    dense_metrics,
    softmax_head,
    subspace_metrics,
)

F64 = torch.float64
DAMPED = set(DAMPED_METRICS)

# name -> (inputs, classes, samples); every case is a Linear layer with cross-entropy
CASES = {
    "inputs_1e-4": dict(width=30, scale=1e-4),
    "inputs_1e-8": dict(width=30, scale=1e-8),
    "near_duplicates": dict(width=30, duplicates=1e-7),
    "mobilenet_head": dict(width=1024, spread=1e-6),
    "tiny_inputs": dict(width=1024, scale=2e-10),  # MobileNetV3's classifier input at init
}
RELATIVE_DAMPINGS = {"default": (1e-3, 1e-6), "tiny": (1e-9, 1e-3)}  # (λ·D/tr F, tolerance)


def make_head(name: str, seed: int = 0, classes: int = 5, samples: int = 8):
    spec = CASES[name]
    g = torch.Generator().manual_seed(seed)
    width = spec["width"]
    if "spread" in spec:  # x_n = x̄ + spread · noise
        mean = torch.rand(width, generator=g, dtype=F64)
        x = mean + spec["spread"] * torch.randn(samples, width, generator=g, dtype=F64)
    elif "duplicates" in spec:  # second half = first half + tiny noise, same labels
        base = torch.randn(samples // 2, width, generator=g, dtype=F64)
        noise = spec["duplicates"] * torch.randn(samples // 2, width, generator=g, dtype=F64)
        x = torch.cat([base, base + noise])
    else:
        x = spec["scale"] * torch.randn(samples, width, generator=g, dtype=F64)
    weight = (2 * torch.rand(classes, width, generator=g, dtype=F64) - 1) / width**0.5
    bias = (2 * torch.rand(classes, generator=g, dtype=F64) - 1) / width**0.5
    y = torch.randint(0, classes, (samples,), generator=g)
    if "duplicates" in spec:
        y = torch.cat([y[: samples // 2], y[: samples // 2]])
    return softmax_head(x, weight, bias, y)


@functools.cache
def head(name: str):
    return make_head(name)


def damping_for(name: str, kind: str) -> float:
    h = head(name)
    return RELATIVE_DAMPINGS[kind][0] * float(torch.trace(h.gram_v())) / h.dimension


@functools.cache
def exact_grams(name: str, through_coefficients: bool):
    return head(name).exact_grams(through_coefficients)


@functools.cache
def reference(name: str, through_coefficients: bool, kind: str) -> dict[str, float]:
    return subspace_metrics(exact_grams(name, through_coefficients), damping_for(name, kind))


def errors(got: dict[str, float], expected: dict[str, float]) -> dict[str, float]:
    """Absolute error for cosines, relative error for everything else."""
    out = {}
    for key in COMPARED:
        diff = abs(got[key] - expected[key])
        out[key] = diff if key in COSINES else diff / abs(expected[key])
    return out


def assert_close(got, expected, tolerance, context=""):
    bad = {k: v for k, v in errors(got, expected).items() if not v <= tolerance}
    assert not bad, f"{context}: errors above {tolerance:g}: {bad}"


# ------------------------------------------------------------- the references themselves
def test_subspace_reference_equals_the_dense_definition():
    """The 60-digit reference in a basis of range([V, U]) equals the D × D definition."""
    h = softmax_head(
        torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(1)) * 1e-3,
        torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(2)),
        torch.randn(4, dtype=F64, generator=torch.Generator().manual_seed(3)),
        torch.tensor([0, 1, 3, 1]),
    )
    v, u = h.factors()
    for damping in (1e-2, 1e-9):
        dense = dense_metrics(v, u, damping)
        for key, value in subspace_metrics(h.exact_grams(False), damping).items():
            assert math.isclose(value, dense[key], rel_tol=1e-13, abs_tol=1e-300), key


def test_hand_written_head_factors_are_consistent():
    """S_n S_nᵀ = diag(p) − ppᵀ, S_n β_n = p − e_y, and the Grams match explicit factors."""
    h = make_head("near_duplicates")
    s = h.sqrt.permute(1, 2, 0)  # N × C × (C − 1)
    probabilities = h.residuals + torch.nn.functional.one_hot(
        h.residuals.argmin(dim=1), h.residuals.shape[1]
    ).to(F64)
    hessians = torch.diag_embed(probabilities) - probabilities.unsqueeze(
        2
    ) * probabilities.unsqueeze(1)
    torch.testing.assert_close(s @ s.mT, hessians, rtol=0, atol=1e-15)
    torch.testing.assert_close(
        (s @ h.beta.unsqueeze(2)).squeeze(2), h.residuals, rtol=0, atol=1e-14
    )
    v, u = h.factors()
    torch.testing.assert_close(h.gram_v(), v.T @ v, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(h.gram_u(), u.T @ u, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(h.gram_uv(), u.T @ v, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v @ h.coefficients(), u, rtol=0, atol=1e-14)


# -------------------------------------------------------------------- the root route
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("kind", list(RELATIVE_DAMPINGS))
def test_root_route_matches_high_precision_under_scale_separation(name, kind):
    h = head(name)
    damping = damping_for(name, kind)
    tolerance = RELATIVE_DAMPINGS[kind][1]
    v_root, u_root = outer_product_roots(h.inputs, h.scaled_sqrt(), h.residuals)
    through_coefficients = root_block_statistics(
        outer_product_roots(h.inputs, h.scaled_sqrt())[0],
        h.dimension,
        [damping],
        coefficients=h.coefficients(),
    )
    woodbury = root_block_statistics(v_root, h.dimension, [damping], u_root=u_root)
    for label, result, exact_u in (
        ("coefficients", through_coefficients, True),
        ("U", woodbury, False),
    ):
        got = finalize(result.statistics, [damping])
        assert_close(got, reference(name, exact_u, kind), tolerance, f"{name}/{kind}/{label}")
        # the estimate says so too
        assert float(result.health.relative_error) < tolerance, label


def test_outer_product_roots_are_an_isometry():
    """V̂ᵀV̂, ÛᵀÛ, ÛᵀV̂ equal the Gram matrices of the explicit factors, in every branch."""
    g = torch.Generator().manual_seed(7)
    for width, outputs, samples, columns in ((9, 4, 3, 2), (3, 6, 5, 1), (7, 30, 4, 3)):
        x = torch.randn(samples, width, generator=g, dtype=F64)
        sqrt = torch.randn(columns, samples, outputs, generator=g, dtype=F64)
        delta = torch.randn(samples, outputs, generator=g, dtype=F64)
        v = (sqrt.unsqueeze(3) * x.view(1, samples, 1, -1)).reshape(columns * samples, -1).T
        u = (delta.unsqueeze(2) * x.unsqueeze(1)).reshape(samples, -1).T / samples**0.5
        v_root, u_root = outer_product_roots(x, sqrt, delta)
        assert v_root.shape[0] <= min(width, samples) * min(outputs, columns * samples + samples)
        torch.testing.assert_close(v_root.T @ v_root, v.T @ v)
        torch.testing.assert_close(u_root.T @ u_root, u.T @ u)
        torch.testing.assert_close(u_root.T @ v_root, u.T @ v)
        assert outer_product_roots(x, sqrt)[1] is None


def random_block(D, N, R, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(D, R, generator=g, dtype=F64) * scale
    u = torch.randn(D, N, generator=g, dtype=F64) * scale / N**0.5
    return v, u


def dense_float64(v, u, damping):
    """Float64 dense definitions (tests/reference.py) of F = VVᵀ, EF = UUᵀ, g = U 1/√N."""
    import reference as dense_reference

    n = u.shape[1]
    per_sample = u.T * n**0.5
    lam = torch.full((v.shape[0],), damping, dtype=F64)
    return dense_reference.dense_metrics(v @ v.T, u @ u.T, per_sample, lam)


@pytest.mark.parametrize("D, N, R", [(30, 5, 8), (12, 20, 6), (25, 7, 40)])
def test_root_route_matches_dense_float64_on_random_factors(D, N, R):
    v, u = random_block(D, N, R, seed=D + N + R)
    dampings = [1e-3, 0.3]
    result = root_block_statistics(v, D, dampings, u_root=u)
    got = finalize(result.statistics, dampings)
    for damping in dampings:
        for key, value in dense_float64(v, u, damping).items():
            actual = got[key + damping_suffix(damping, True)] if key in DAMPED else got[key]
            assert actual == pytest.approx(value, rel=1e-8, abs=1e-10), (key, damping)


def test_root_route_with_coefficients_matches_dense_and_keeps_g_in_range():
    g = torch.Generator().manual_seed(11)
    D, N, columns = 40, 4, 3
    v = torch.randn(D, columns * N, generator=g, dtype=F64)
    beta = torch.randn(columns, N, generator=g, dtype=F64)
    B = torch.zeros(columns, N, N, dtype=F64)
    B[:, torch.arange(N), torch.arange(N)] = beta
    B = B.reshape(columns * N, N)
    u = v @ B
    for damping in (1e-6, 1e-2):
        got = finalize(root_block_statistics(v, D, [damping], coefficients=B).statistics, [damping])
        for key, value in dense_float64(v, u, damping).items():
            assert got[key] == pytest.approx(value, rel=1e-7, abs=1e-10), key


def test_root_route_needs_exactly_one_empirical_side():
    v, u = random_block(10, 3, 4, seed=0)
    with pytest.raises(ValueError, match="exactly one"):
        root_block_statistics(v, 10, [0.1])
    with pytest.raises(ValueError, match="exactly one"):
        root_block_statistics(v, 10, [0.1], u_root=u, coefficients=torch.zeros(4, 3, dtype=F64))


def test_prefer_root_route_is_a_cost_bound():
    assert prefer_root_route(40, 32)  # the MobileNet head with 8 samples
    assert not prefer_root_route(1280, 1152)  # the MLP's output layer with 128 samples


# -------------------------------------------------------------------- the Gram route
def gram_results(name: str, damping: float):
    h = head(name)
    kv, B = h.gram_v(), h.coefficients()
    gram_uv = B.T @ kv
    several = [damping] * SPECTRAL_MIN_DAMPINGS
    return {
        "cholesky": (
            gram_block_statistics(gram_uv @ B, kv, gram_uv, h.dimension, [damping], B),
            True,
        ),
        "spectral": (
            gram_block_statistics(gram_uv @ B, kv, gram_uv, h.dimension, several, B),
            True,
        ),
        "woodbury": (
            gram_block_statistics(h.gram_u(), kv, h.gram_uv(), h.dimension, [damping]),
            False,
        ),
    }


def first(statistics, damping):
    """Metrics of the first damping of a (possibly repeated) damping list."""
    from fisher_monitor.metrics import LayerStatistics

    fields = (
        "dimension",
        "trace_f",
        "trace_ef",
        "frob_f_sq",
        "frob_ef_sq",
        "inner",
        "frob_diff_sq",
    )
    single = LayerStatistics(
        **{f: getattr(statistics, f) for f in fields}, damped=statistics.damped[:1]
    )
    return finalize(single, [damping])


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("kind", list(RELATIVE_DAMPINGS))
def test_gram_route_is_accurate_or_says_it_may_not_be(name, kind):
    """Float64 Gram matrices blur curvature below ε·‖K‖: the health estimate must cover it.

    Every metric but the KL divergence (a difference of terms, not covered) is within the
    estimate (times 3, an estimate's margin) or within the tolerance.
    """
    damping = damping_for(name, kind)
    tolerance = RELATIVE_DAMPINGS[kind][1]
    for route, (result, exact_u) in gram_results(name, damping).items():
        try:
            got = first(result.statistics, damping)
        except FloatingPointError:  # finalize refuses values out of range: flagged too
            assert float(result.health.relative_error) > tolerance, route
            continue
        estimate = float(result.health.relative_error)
        for key, error in errors(got, reference(name, exact_u, kind)).items():
            if key == "kl":
                continue
            if math.isnan(error):  # e.g. a cosine of a vector whose squared norm came out 0
                assert estimate > tolerance, (route, key)
            else:
                assert error <= max(tolerance, 3.0 * estimate), (route, key, error, estimate)


def test_gram_route_flags_the_mobilenet_head_the_root_route_gets_right():
    """The issue's failure: Gram matrices of a head on inputs 1e-10 small lose the weights."""
    name, kind = "tiny_inputs", "default"
    damping = damping_for(name, kind)
    result, _ = gram_results(name, damping)["cholesky"]
    assert float(result.health.relative_error) > 1e-3
    h = head(name)
    root = root_block_statistics(
        outer_product_roots(h.inputs, h.scaled_sqrt())[0],
        h.dimension,
        [damping],
        coefficients=h.coefficients(),
    )
    assert float(root.health.relative_error) < 1e-6
    assert_close(finalize(root.statistics, [damping]), reference(name, True, kind), 1e-9)


def test_spectral_and_cholesky_routes_agree_on_random_factors():
    g = torch.Generator().manual_seed(3)
    D, N, columns = 60, 6, 4
    v = torch.randn(D, columns * N, generator=g, dtype=F64)
    beta = torch.randn(columns, N, generator=g, dtype=F64)
    B = torch.zeros(columns, N, N, dtype=F64)
    B[:, torch.arange(N), torch.arange(N)] = beta
    B = B.reshape(columns * N, N)
    kv = v.T @ v
    dampings = [1e-4 * 3**i for i in range(SPECTRAL_MIN_DAMPINGS)]
    together = finalize(lowrank_statistics(B.T @ kv @ B, kv, B.T @ kv, D, dampings, B), dampings)
    for damping in dampings:
        alone = finalize(lowrank_statistics(B.T @ kv @ B, kv, B.T @ kv, D, [damping], B), [damping])
        for key, value in alone.items():
            suffixed = key + damping_suffix(damping, True) if key in DAMPED else key
            assert together[suffixed] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        for key, value in dense_float64(v, v @ B, damping).items():
            assert alone[key] == pytest.approx(value, rel=1e-7, abs=1e-10), key


def test_joint_basis_matches_dense_when_g_is_outside_the_fisher_range():
    v, u = random_block(30, 5, 6, seed=4)
    damping = 1e-3
    got = finalize(
        joint_basis_block_statistics(u.T @ u, v.T @ v, u.T @ v, 30, [damping]).statistics,
        [damping],
    )
    for key, value in dense_float64(v, u, damping).items():
        assert got[key] == pytest.approx(value, rel=1e-7, abs=1e-10), key


# ------------------------------------------------------------------ shared EF solves
def test_empirical_solves_share_one_factorisation_and_match_one_at_a_time():
    v, u = random_block(20, 7, 5, seed=9)
    gram_u = u.T @ u
    dampings = [1e-5, 1e-2, 1.0]
    shared = empirical_solves(gram_u, dampings)
    for damping, solve in zip(dampings, shared, strict=True):
        single = empirical_solve(gram_u, damping)
        for field in ("coefficients", "ef_projection", "ef_sq", "per_sample", "logdet_ratio"):
            torch.testing.assert_close(
                getattr(solve, field), getattr(single, field), rtol=1e-9, atol=1e-12
            )


def test_precomputed_empirical_solves_give_the_same_statistics():
    v, u = random_block(25, 5, 7, seed=5)
    gram_u, gram_v, gram_uv = u.T @ u, v.T @ v, u.T @ v
    dampings = [1e-3, 1e-1]
    solves = empirical_solves(gram_u, dampings, 25)
    with_solves = finalize(
        lowrank_statistics(gram_u, gram_v, gram_uv, 25, dampings, empirical=solves), dampings
    )
    without = finalize(lowrank_statistics(gram_u, gram_v, gram_uv, 25, dampings), dampings)
    assert with_solves == pytest.approx(without, rel=1e-12)
    block = gram_block_statistics(gram_u, gram_v, gram_uv, 25, dampings)
    assert len(block.empirical) == len(dampings)
    with pytest.raises(ValueError, match="one per damping"):
        lowrank_statistics(gram_u, gram_v, gram_uv, 25, dampings, empirical=solves[:1])


def test_health_is_small_on_well_conditioned_factors():
    v, u = random_block(40, 6, 9, seed=6)
    damping = 1e-2
    for result in (
        gram_block_statistics(u.T @ u, v.T @ v, u.T @ v, 40, [damping]),
        root_block_statistics(v, 40, [damping], u_root=u),
    ):
        assert float(result.health.relative_error) < 1e-10, result.health.route


@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 20),
    st.integers(1, 8),
    st.integers(1, 10),
    st.floats(-6, 6),
    st.floats(1e-8, 10.0),
    st.integers(0, 2**31 - 1),
    st.booleans(),
)
def test_root_route_is_well_behaved_on_rank_deficient_factors(
    D, N, R, log_scale, damping, seed, through_coefficients
):
    """Cosines in [−1, 1], KL ≥ 0, per-sample projection ≤ rank EF, and the dense answer."""
    g = torch.Generator().manual_seed(seed)
    scale = 10.0**log_scale
    rank = min(N, R, D)
    basis = torch.randn(D, rank, generator=g, dtype=F64)
    v = basis @ torch.randn(rank, R, generator=g, dtype=F64) * scale
    if through_coefficients:
        B = torch.randn(R, N, generator=g, dtype=F64)
        u = v @ B
        kwargs = dict(coefficients=B)
    else:
        u = basis @ torch.randn(rank, N, generator=g, dtype=F64) * scale
        kwargs = dict(u_root=u)
    lam = damping * scale**2
    values = finalize(root_block_statistics(v, D, [lam], **kwargs).statistics, [lam])
    for key in COSINES:
        if not math.isnan(values[key]):
            assert -1.0 <= values[key] <= 1.0, key
    assert values["kl"] >= 0.0
    rank_ef = int(torch.linalg.matrix_rank(u))
    assert values["ef_projection_per_sample"] <= rank_ef + 1e-6 * max(1, rank_ef)
    dense = dense_float64(v, u, lam)
    condition = (float(torch.linalg.matrix_norm(v, 2)) ** 2 + lam) / lam
    tolerance = max(1e-7, 1e-13 * condition)
    for key in ("trace_ratio", "matrix_cosine", "ef_projection", "ef_projection_per_sample"):
        assert math.isclose(values[key], dense[key], rel_tol=tolerance, abs_tol=1e-9), key


def test_block_sparse_coefficients_multiply_like_the_dense_matrix():
    from fisher_monitor.factors import CoefficientMatrix

    generator = torch.Generator().manual_seed(0)
    beta = torch.randn(3, 5, dtype=torch.float64, generator=generator)  # R_n = 3, N = 5
    sparse = CoefficientMatrix(beta)
    dense = sparse.dense()
    assert sparse.shape == dense.shape == (15, 5)
    assert torch.count_nonzero(dense) == 15 and dense[2 * 5 + 4, 4] == beta[2, 4]
    x, rows = torch.randn(5, dtype=torch.float64), torch.randn(15, dtype=torch.float64)
    many, left = torch.randn(5, 4, dtype=torch.float64), torch.randn(7, 15, dtype=torch.float64)
    torch.testing.assert_close(sparse @ x, dense @ x, rtol=1e-14, atol=0)
    torch.testing.assert_close(sparse @ many, dense @ many, rtol=1e-14, atol=0)
    torch.testing.assert_close(rows @ sparse, rows @ dense, rtol=1e-14, atol=0)
    torch.testing.assert_close(left @ sparse, left @ dense, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="cannot multiply a tensor of shape"):
        sparse @ torch.randn(3, 5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="on the left"):
        torch.randn(2, 1, 15, dtype=torch.float64) @ sparse
    with pytest.raises(TypeError, match="holds torch.float64"):
        sparse @ x.float()


def test_logistic_regression_on_many_samples_forms_no_sample_by_sample_matrix(monkeypatch):
    """D = 3, N = 20,000: the root route in the coefficients' own storage (a dense B or an
    N × N Gram would take 3.2 GB); the numbers are the dense definitions'."""
    import fisher_monitor.structures.block.structure as block
    from fisher_monitor import measure
    from fisher_monitor.factors import CoefficientMatrix

    def refuse(*args, **kwargs):
        raise AssertionError("an N × N matrix was formed")

    monkeypatch.setattr(CoefficientMatrix, "dense", refuse)
    monkeypatch.setattr(block, "_grams", refuse)
    generator = torch.Generator().manual_seed(0)
    n = 20_000
    inputs = torch.randn(n, 2, dtype=torch.float64, generator=generator)
    labels = (torch.rand(n, 1, dtype=torch.float64, generator=generator) < 0.3).double()
    model = torch.nn.Linear(2, 1).double()
    m = measure(
        model, torch.nn.BCEWithLogitsLoss(), inputs, labels, structures=("block",), damping=1e-3
    )
    features = torch.cat([inputs, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    with torch.no_grad():
        p = torch.sigmoid(model(inputs))
    fisher = (features * (p * (1 - p))).T @ features / n
    per_sample = (p - labels) * features
    empirical = per_sample.T @ per_sample / n
    expected = torch.linalg.matrix_norm(empirical - fisher) / torch.linalg.matrix_norm(fisher)
    assert m["block/rel_error/all"] == pytest.approx(expected.item(), rel=1e-9)
    assert m["block/trace_ratio/all"] == pytest.approx(
        (empirical.trace() / fisher.trace()).item(), rel=1e-12
    )
