"""Estimators for many classes: the sketch, its replicate groups, the jackknife, the cost model.

The definition test (:func:`test_sketched_metrics_match_the_dense_definition`) rebuilds the
estimator from first principles on tiny float64 models: the sketched columns
``J_nᵀ S_n w / √(N k)`` from torch.func Jacobians and the same Rademacher signs, dense
``D × D`` group estimates ``F̂_g``, every replicate's metrics with explicit inverses, and
the jackknife written out; the engine must agree to rounding. The statistical tests check
that the estimates are unbiased and that the standard errors cover the exact values.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import reference
from cases import make_problem
from fisher_monitor import keys, measure
from fisher_monitor.curvature.backends import prepare
from fisher_monitor.engine import cost
from fisher_monitor.engine.pipeline import MeasureOptions, measure_once
from fisher_monitor.estimators import (
    SketchDesign,
    SketchedLikelihood,
    jackknife,
    sketch_columns,
)
from fisher_monitor.estimators.groups import pair_means
from fisher_monitor.estimators.sketch import rademacher
from fisher_monitor.likelihoods import resolve_loss
from fisher_monitor.settings import MeasureSettings

FISHER_INVERSE = ("kl", "direction_cosine", "nat_grad_cosine", "nat_projection")


def sequence_model(classes: int = 5) -> nn.Module:
    """Embedding → Linear over positions, outputs ``(N, C, T)`` (a tiny language model)."""

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(7, 3)
            self.out = nn.Linear(3, classes)

        def forward(self, tokens):
            return self.out(torch.tanh(self.embed(tokens))).transpose(1, 2)

    return Tagger().double()


def sequence_problem(n: int = 6, positions: int = 3, classes: int = 5, seed: int = 0):
    torch.manual_seed(seed)
    model = sequence_model(classes)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 7, (n, positions), generator=generator)
    targets = torch.randint(0, classes, (n, positions), generator=generator)
    return model, tokens, targets, nn.CrossEntropyLoss()


def classifier_problem(n: int = 8, classes: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, classes)).double()
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, classes, (n,), generator=generator)
    return model, inputs, targets, nn.CrossEntropyLoss()


def run(model, loss, inputs, targets, estimator="sketch", seed=1, backend="auto", **kw):
    settings = MeasureSettings.create(
        kw.pop("structures", ("diag", "block")),
        damping=kw.pop("damping", 1e-3),
        damping_mode=kw.pop("damping_mode", "relative"),
    )
    prepared = prepare(model, resolve_loss(loss), backend)
    try:
        return measure_once(
            prepared,
            settings,
            inputs,
            targets,
            MeasureOptions(seed=seed, estimator=estimator, **kw),
        )
    finally:
        prepared.close()


# ----------------------------------------------------------------------------- the sketch
def _all_signs(count: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product((-1.0, 1.0), repeat=count)), dtype=torch.float64)


@pytest.mark.parametrize("loss", ["ce", "ce_positions", "mse", "bce"])
def test_sketch_averages_to_the_loss_hessian_exactly(loss):
    """Over all 2^K sign vectors, the mean of ``s sᵀ`` is ``H_n`` (no sampling involved)."""
    generator = torch.Generator().manual_seed(3)
    if loss == "ce":
        module, outputs = nn.CrossEntropyLoss(), torch.randn(2, 4, generator=generator)
    elif loss == "ce_positions":
        module, outputs = nn.CrossEntropyLoss(), torch.randn(2, 3, 2, generator=generator)
    elif loss == "mse":
        module, outputs = nn.MSELoss(), torch.randn(2, 3, generator=generator)
    else:
        module, outputs = nn.BCEWithLogitsLoss(), torch.randn(2, 1, generator=generator)
    outputs = outputs.double() * 3
    likelihood = resolve_loss(module)
    size = outputs[0].numel()
    signs = _all_signs(size)  # (2^K, K) in the output's flattened order
    noise = signs.reshape(1, -1, *outputs.shape[1:]).expand(
        outputs.shape[0], -1, *outputs.shape[1:]
    )
    columns = sketch_columns(likelihood, outputs, noise)  # (N, K, 2^K), carries 1/√(2^K)
    mean = columns @ columns.transpose(1, 2)
    roots = likelihood.sqrt_hessian(outputs)
    torch.testing.assert_close(mean, roots @ roots.transpose(1, 2), rtol=1e-12, atol=1e-14)


def test_sketched_likelihood_keeps_everything_else():
    base = resolve_loss(nn.CrossEntropyLoss(reduction="sum"))
    sketched = SketchedLikelihood(base)
    outputs = torch.randn(3, 4, dtype=torch.float64)
    targets = torch.tensor([0, 3, 1])
    torch.testing.assert_close(
        sketched.residuals(outputs, targets), base.residuals(outputs, targets)
    )
    assert sketched.fisher_columns((4, 5)) == base.fisher_columns((4, 5)) == 15
    assert sketched.loss_name == "CrossEntropyLoss"
    assert isinstance(sketched.make_module(), nn.CrossEntropyLoss)
    noise = sketched.draw_noise(outputs, 6)
    assert noise.shape == (3, 6, 4) and set(noise.unique().tolist()) == {-1.0, 1.0}


# ----------------------------------------------------------------------------- jackknife
def test_jackknife_of_a_mean_is_the_mean_with_its_standard_error():
    """For a linear statistic the correction vanishes and v_J is the variance of the mean."""
    values = torch.tensor([1.0, 2.5, 0.5, 4.0, 3.0], dtype=torch.float64)
    g = len(values)
    full = float(values.mean())
    leave_one_out = [float((values.sum() - v) / (g - 1)) for v in values]
    estimate = jackknife(full, leave_one_out)
    assert estimate.value == pytest.approx(full, abs=1e-12)
    assert estimate.stderr == pytest.approx(float(values.std() / g**0.5), rel=1e-12)


def test_jackknife_turns_a_squared_mean_into_the_u_statistic():
    """θ = (mean x)²: θ_J = mean over distinct pairs of x_g x_h (unbiased for μ²)."""
    values = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    g = len(values)
    full = float(values.mean() ** 2)
    leave_one_out = [float(((values.sum() - v) / (g - 1)) ** 2) for v in values]
    pairs = sum(float(a * b) for i, a in enumerate(values) for j, b in enumerate(values) if i != j)
    assert jackknife(full, leave_one_out).value == pytest.approx(pairs / (g * (g - 1)), abs=1e-12)


def test_pair_means_are_u_statistics_per_replicate():
    generator = torch.Generator().manual_seed(0)
    pairs = torch.rand(5, 5, generator=generator, dtype=torch.float64)
    pairs = pairs + pairs.T
    means = pair_means(pairs)
    for index, subset in enumerate(
        [range(5)] + [[g for g in range(5) if g != i] for i in range(5)]
    ):
        distinct = [float(pairs[a, b]) for a in subset for b in subset if a != b]
        assert float(means[index]) == pytest.approx(sum(distinct) / len(distinct), rel=1e-12)


def test_jackknife_needs_two_groups_and_passes_nan_through():
    with pytest.raises(ValueError, match="at least 2 groups"):
        jackknife(1.0, [1.0])
    assert math.isnan(jackknife(float("nan"), [1.0, 2.0]).value)
    assert jackknife(3.0, [3.0, 3.0, 3.0]).stderr is None  # no randomness: no standard error


def test_sketch_design_is_validated():
    with pytest.raises(ValueError, match="at least 3 replicate groups"):
        SketchDesign(groups=2)
    with pytest.raises(ValueError, match="at least 1 column"):
        SketchDesign(columns_per_group=0)
    with pytest.raises(ValueError, match="Invalid estimator: 'fast'"):
        cost.check_estimator("fast")


# ----------------------------------------------------------------------------- definition
def _reference_signs(outputs: torch.Tensor, columns: int, seed: int) -> torch.Tensor:
    """The Rademacher signs the pass draws: the first draw after the seeded forward."""
    torch.manual_seed(seed)
    return rademacher((outputs.shape[0], columns, *outputs.shape[1:]))


def _hessian_roots(model, loss, inputs, targets) -> torch.Tensor:
    """The square roots ``S_n`` (``K × K``) the sketch applies to Rademacher signs.

    Softmax: ``S = diag(τ)(I − ττᵀ)`` per position (``τ = √p``); Gaussian: ``√c I``. Both
    are checked against the torch.func loss-Hessians, ``S Sᵀ = H``.
    """
    hessians = reference.output_hessians(model, loss, inputs, targets)
    with torch.no_grad():
        outputs = model(inputs)
    n, size = outputs.shape[0], outputs[0].numel()
    if isinstance(loss, nn.CrossEntropyLoss):
        classes = outputs.shape[1]
        tau = outputs.log_softmax(dim=1).mul(0.5).exp().reshape(n, classes, -1)  # (N, C, T)
        eye = torch.eye(classes, dtype=tau.dtype)
        roots = torch.zeros(n, size, size, dtype=tau.dtype)
        positions = tau.shape[2]
        for i in range(n):
            for t in range(positions):
                block = torch.diag(tau[i, :, t]) @ (eye - torch.outer(tau[i, :, t], tau[i, :, t]))
                index = torch.arange(classes) * positions + t  # output flattened as (c, t)
                roots[i][index.unsqueeze(1), index] = block
    else:  # Gaussian: H = c·I
        roots = hessians.diagonal(dim1=1, dim2=2).sqrt().diag_embed()
    torch.testing.assert_close(roots @ roots.transpose(1, 2), hessians, rtol=1e-10, atol=1e-12)
    return roots


def _sketched_columns(model, loss, inputs, targets, seed, design):
    """The sketch's columns ``v_(j,n) = J_nᵀ S_n w_{n,j}/√(N k)``, ``(k, N, D)``, brute force."""
    with torch.no_grad():
        outputs = model(inputs)
    n, k = outputs.shape[0], design.columns
    signs = _reference_signs(outputs, k, seed).reshape(n, k, -1)  # (N, k, K)
    sides = torch.einsum("nab,njb->nja", _hessian_roots(model, loss, inputs, targets), signs)
    jac = reference.output_jacobians(model, inputs)  # (N, K, D)
    return torch.einsum("njk,nkd->jnd", sides, jac) / (n * k) ** 0.5


def _sketched_groups(model, loss, inputs, targets, seed, design):
    """Dense unbiased ``F̂_g = G Σ_{j∈g,n} v v ᵀ`` per group (D × D)."""
    columns = _sketched_columns(model, loss, inputs, targets, seed, design)
    per_group = columns.reshape(design.groups, -1, columns.shape[-1])
    return [design.groups * c.T @ c for c in per_group]


def _unbiased_squares(columns, kept, rows):
    """‖F‖² from the kept column indices (definition in the block estimator's docstring)."""
    k, n = columns.shape[0], columns.shape[1]
    v = columns[kept][:, :, rows]  # (k_S, N, D_b)
    flat = v.reshape(-1, v.shape[-1])
    gram = flat @ flat.T
    k_s = len(kept)
    distinct = float(gram.square().sum() - gram.diagonal().square().sum())
    same = 0.0
    for i in range(n):
        for a in range(k_s):
            for b in range(k_s):
                if a != b:
                    same += float(v[a, i] @ v[b, i]) ** 2
    return (k / k_s) ** 2 * (distinct + same / (k_s - 1))


def _jackknifed(values: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    full, rest = values[0], values[1:]
    g = len(rest)
    out = {}
    for name, theta in full.items():
        others = [r[name] for r in rest]
        mean = sum(others) / g
        corrected = g * theta - (g - 1) * mean
        variance = (g - 1) / g * sum((o - mean) ** 2 for o in others)
        out[name] = (corrected, math.sqrt(variance + (corrected - theta) ** 2))
    return out


def _replicate_sets(groups: int) -> list[list[int]]:
    return [list(range(groups))] + [[g for g in range(groups) if g != i] for i in range(groups)]


def _reference_estimates(model, loss, inputs, targets, seed, design, damping=1e-3):
    """Every key and ``_se`` key of the sketched ``diag`` and ``block`` structures, densely."""
    columns = _sketched_columns(model, loss, inputs, targets, seed, design)
    per_group = columns.reshape(design.groups, -1, columns.shape[-1])
    groups = [design.groups * c.T @ c for c in per_group]
    per_sample = reference.per_sample_gradients(model, loss, inputs, targets)
    ef = reference.empirical_fisher(per_sample)
    slices = reference.layer_slices(model)
    scopes = {**slices, "all": slice(0, ef.shape[0])}
    m = design.columns_per_group
    out: dict[str, float] = {}
    for structure in ("diag", "block"):
        restricted = [reference.restrict(f, structure, slices) for f in groups]
        ef_s = reference.restrict(ef, structure, slices)
        replicates = []
        for subset in _replicate_sets(design.groups):
            f_s = sum(restricted[g] for g in subset) / len(subset)
            lam = reference.damping_vector(f_s, slices, damping, "relative")
            kept = [g * m + j for g in subset for j in range(m)]
            values = {}
            squares = {}  # per layer: (‖F‖² estimate kept ≥ ⟨EF, F⟩²/‖EF‖², ⟨EF, F⟩, ‖EF‖²)
            for scope, s in scopes.items():
                fisher, empirical = f_s[s, s], ef_s[s, s]
                dense = reference.dense_metrics(fisher, empirical, per_sample[:, s], lam[s])
                if scope == "all":  # additive over layers
                    frob_f, inner, frob_ef = (sum(v[i] for v in squares.values()) for i in range(3))
                else:
                    if structure == "diag":  # U-statistic over distinct groups
                        pairs = [
                            float((restricted[a][s, s] * restricted[b][s, s]).sum())
                            for a in subset
                            for b in subset
                            if a != b
                        ]
                        estimate = sum(pairs) / len(pairs)
                    else:  # over distinct columns, self-pairs from the same sample's pairs
                        estimate = _unbiased_squares(columns, kept, s)
                    inner = float((empirical * fisher).sum())
                    frob_ef = float(empirical.square().sum())
                    frob_f = max(estimate, inner**2 / frob_ef)
                    squares[scope] = (frob_f, inner, frob_ef)
                dense["rel_error"] = math.sqrt(max(frob_f + frob_ef - 2 * inner, 0.0) / frob_f)
                dense["matrix_cosine"] = inner / math.sqrt(frob_ef * frob_f)
                for metric, value in dense.items():
                    values[f"{structure}/{metric}/{scope}"] = value
            replicates.append(values)
        for key, (value, stderr) in _jackknifed(replicates).items():
            metric = keys.parse_key(key).metric
            if structure == "block" and metric in FISHER_INVERSE:
                continue
            if metric in keys.COSINE_METRICS:  # estimates are put back into the range
                value = min(1.0, max(0.0 if metric == "matrix_cosine" else -1.0, value))
            else:
                value = max(0.0, value)
            out[key] = value
            if metric != "dimension":
                parsed = keys.parse_key(key)
                out[keys.stderr_key(structure, metric, parsed.layer)] = stderr
    return out


def conv_sequence_problem(n: int = 5, positions: int = 4, classes: int = 6, seed: int = 0):
    """Conv1d over positions, cross-entropy over ``(N, C, T)`` (BackPACK's weight sharing)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv1d(2, 4, kernel_size=3, padding=1), nn.Tanh(), nn.Conv1d(4, classes, 1)
    ).double()
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 2, positions, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, classes, (n, positions), generator=generator)
    return model, inputs, targets, nn.CrossEntropyLoss()


DEFINITION_CASES = [
    ("classifier", "backpack"),  # outer-product factors
    ("classifier", "functorch"),
    ("cnn", "backpack"),  # weight sharing (convolutions)
    ("cnn", "functorch"),
    ("conv_sequence", "backpack"),  # positions: a sketch column spans every position
    ("embedding_sequence", "functorch"),
    ("regression", "backpack"),  # Gaussian: s = √c·w
]


@pytest.mark.parametrize(("problem", "backend"), DEFINITION_CASES)
def test_sketched_metrics_match_the_dense_definition(problem, backend):
    """Estimates and standard errors equal the brute-force float64 construction."""
    if problem == "classifier":
        model, inputs, targets, loss = classifier_problem()
    elif problem == "cnn":
        model, inputs, targets, case = make_problem("cnn", "ce", n=5, seed=4)
        loss = case.module("mean")
    elif problem == "conv_sequence":
        model, inputs, targets, loss = conv_sequence_problem()
    elif problem == "regression":
        model, inputs, targets, case = make_problem("mlp", "mse3", n=6, seed=3)
        loss = case.module("mean")
    else:
        model, inputs, targets, loss = sequence_problem()
    design = cost.DEFAULT_SKETCH
    m = run(model, loss, inputs, targets, seed=7, backend=backend)
    expected = _reference_estimates(model, loss, inputs, targets, 7, design)
    measured = {k for k in m.scalars if keys.parse_key(k)}
    for key in measured | set(expected):
        parsed = keys.parse_key(key)
        if parsed.stderr:  # compared on the scale of the metric (some SEs are ~1e-9 of it)
            metric = keys.metric_key(parsed.structure, parsed.metric, parsed.layer)
            scale = max(1.0, abs(expected[metric]))
            # a metric the signs do not move (e.g. Rademacher squares of a Gaussian output
            # layer's diagonal) has no standard error; rounding may leave a tiny one
            got, want = m.scalars.get(key, 0.0), expected.get(key, 0.0)
            assert got == pytest.approx(want, rel=1e-6, abs=1e-10 * scale), key
        else:
            assert m.scalars[key] == pytest.approx(expected[key], rel=1e-7, abs=1e-10), key
    assert {k for k in measured if not keys.parse_key(k).stderr} == {
        k for k in expected if not keys.parse_key(k).stderr
    }
    assert not any(
        keys.parse_key(k).metric in FISHER_INVERSE for k in measured if k.startswith("block/")
    )


def test_sketched_diagonal_matches_the_reference_sketch():
    """``Measurement.diagonals`` under the sketch is ``diag F̂`` of the brute-force columns."""
    model, inputs, targets, loss = classifier_problem()
    design = cost.DEFAULT_SKETCH
    m = run(model, loss, inputs, targets, seed=11, structures=("diag",))
    groups = _sketched_groups(model, loss, inputs, targets, 11, design)
    full = torch.diagonal(sum(groups) / design.groups)
    got = torch.cat([m.diagonals[name][0] for name in m.layer_names])
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- statistics
@pytest.mark.montecarlo
def test_sketched_fisher_diagonal_is_unbiased():
    """Mean of 60 sketched diagonals vs the exact one: max |z| < 5 over the entries.

    Each run's diagonal averages 8 Rademacher columns per sample; over K = 60 runs
    z = (mean − exact)/(sd/√K) is close to standard normal per entry (≤ 60 entries:
    false-alarm probability below 1e-4; the seeds are fixed).
    """
    model, inputs, targets, loss = classifier_problem(n=6, classes=5)
    exact = measure(model, loss, inputs, targets, structures=("diag",))
    target = torch.cat([exact.diagonals[name][0] for name in exact.layer_names])
    runs = []
    for seed in range(60):
        m = run(model, loss, inputs, targets, seed=seed, structures=("diag",))
        runs.append(torch.cat([m.diagonals[name][0] for name in m.layer_names]))
    samples = torch.stack(runs)
    std = samples.std(dim=0)
    informative = std > 1e-12 * target.abs().max()
    z = (samples.mean(dim=0) - target)[informative] / (std[informative] / len(runs) ** 0.5)
    assert informative.sum() > 20
    assert z.abs().max() < 5.0


@pytest.mark.montecarlo
@pytest.mark.slow
def test_standard_errors_cover_the_exact_values():
    """Over 200 seeds, the exact value lies within ±2 SE in at least 82% of them.

    With G = 6 replicate groups the jackknife t-ratio (estimate − truth)/SE follows about a
    Student t with 5 degrees of freedom, so ±2 SE covers about 90% (P(|t₅| < 2) = 0.898;
    the bias-correction term in the SE adds a little). Per metric, 200 seeds give a
    binomial standard deviation of 2.1 points: 82% is more than three below; the mean over
    all metrics (about 60 of them, correlated) must reach 87%. The exact values come from
    the exact path on the same model (itself tested against the dense reference).
    """
    model, inputs, targets, loss = classifier_problem(n=16, classes=10, seed=2)
    exact = run(model, loss, inputs, targets, estimator="exact").scalars
    covered: dict[str, list[bool]] = {}
    prepared = prepare(model, resolve_loss(loss), "backpack")
    settings = MeasureSettings.create(("diag", "block"))
    try:
        for seed in range(200):
            options = MeasureOptions(seed=1000 + seed, estimator="sketch")
            m = measure_once(prepared, settings, inputs, targets, options).scalars
            for key, value in m.items():
                parsed = keys.parse_key(key)
                if parsed is None or parsed.stderr:
                    continue
                stderr = m.get(keys.stderr_key(parsed.structure, parsed.metric, parsed.layer))
                if stderr is None:
                    continue
                covered.setdefault(key, []).append(abs(value - exact[key]) <= 2 * stderr)
    finally:
        prepared.close()
    rates = {key: sum(hits) / len(hits) for key, hits in covered.items()}
    assert len(rates) >= 40
    assert min(rates.values()) >= 0.82, sorted(rates.items(), key=lambda kv: kv[1])[:5]
    assert sum(rates.values()) / len(rates) >= 0.87


@pytest.mark.montecarlo
def test_standard_errors_shrink_with_more_columns():
    """Eight columns per group instead of one: SEs fall by about √8 ≈ 2.8 (we require 1.7)."""
    model, inputs, targets, loss = classifier_problem(n=12, classes=8, seed=5)
    settings = MeasureSettings.create(("diag", "block"))
    prepared = prepare(model, resolve_loss(loss), "backpack")
    names = ["block/rel_error_se/all", "block/trace_ratio_se/all", "diag/kl_se/all"]
    totals = {1: dict.fromkeys(names, 0.0), 8: dict.fromkeys(names, 0.0)}
    try:
        for per_group in (1, 8):
            sketch = SketchDesign(groups=8, columns_per_group=per_group)
            for seed in range(10):
                options = MeasureOptions(seed=seed, estimator="sketch", sketch=sketch)
                m = measure_once(prepared, settings, inputs, targets, options)
                assert m.settings["estimator"]["columns_per_sample"] == 8 * per_group
                for name in names:
                    totals[per_group][name] += m[name]
    finally:
        prepared.close()
    for name in names:
        assert totals[8][name] < totals[1][name] / 1.7, name


# ----------------------------------------------------------------------------- cost model
def test_small_problems_stay_exact_with_identical_numbers():
    model, inputs, targets, loss = classifier_problem()
    auto = run(model, loss, inputs, targets, estimator="auto")
    exact = run(model, loss, inputs, targets, estimator="exact")
    assert auto.scalars == exact.scalars
    assert "estimator" not in auto.settings
    assert all(entry["estimator"] == {"diag": "exact", "block": "exact"} for entry in auto.coverage)
    assert not any(keys.parse_key(k).stderr for k in auto.scalars if keys.parse_key(k))


def wide_classifier(classes: int = 2000, n: int = 64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, classes))
    inputs = torch.randn(n, 8)
    targets = torch.randint(0, classes, (n,))
    return model, inputs, targets


def test_many_classes_switch_to_the_sketch_and_say_so():
    """R = 1999·64 exact columns: the cost model estimates, with notes, coverage, settings."""
    model, inputs, targets = wide_classifier()
    loss = nn.CrossEntropyLoss()
    m = run(model, loss, inputs, targets, estimator="auto", structures=("diag", "block", "kron"))
    assert m.settings["estimator"]["method"] == "sketch"
    assert m.settings["estimator"]["exact_columns_per_sample"] == 1999
    assert m.settings["estimator"]["forced"] is False
    expected = {"diag": "sketch", "block": "sketch", "kron": None}
    assert all(e["estimator"] == expected for e in m.coverage)
    text = " ".join(m.notes)
    assert "1,999 square-root columns per sample" in text
    assert "estimated from 6 sketched columns per sample in 6 replicate groups" in text
    assert "block: direction_cosine, kl, nat_grad_cosine, nat_projection" in text
    assert "kron:" in text and not any(k.startswith("kron/") for k in m.keys())
    assert "block/direction_cosine/all" not in m.scalars
    for key in ("block/trace_ratio", "block/rel_error", "diag/direction_cosine", "diag/kl"):
        structure, metric = key.split("/")
        value = m[f"{key}/all"]
        stderr = m[keys.stderr_key(structure, metric, "all")]
        assert math.isfinite(value) and 0 < stderr < abs(value)
    assert m["probe/batch_size"] == 64


def test_memory_budget_prefers_the_sketch_over_sub_sampling():
    """An exact path over the memory budget is estimated, not run on fewer samples."""
    model, inputs, targets, loss = classifier_problem(n=32, classes=40)
    prepared = prepare(model, resolve_loss(loss), "backpack")
    settings = MeasureSettings.create(("diag", "block"))
    try:
        shapes, columns = cost.layer_shapes(prepared, inputs)
        plan = cost.plan(prepared, settings, inputs, 32, memory_budget=10**12)
        assert plan.sketch is None and columns == 39
        tight = plan.estimated.peak_bytes + 1
        plan = cost.plan(prepared, settings, inputs, 32, memory_budget=tight)
        assert plan.sketch is not None and "GiB (budget" in plan.reason
        assert plan.pass_columns == plan.sketch.columns + 1
    finally:
        prepared.close()


def test_exact_only_requests_keep_the_exact_fisher_with_a_note():
    model, inputs, targets = wide_classifier(classes=600, n=48)
    prepared = prepare(model, resolve_loss(nn.CrossEntropyLoss()), "backpack")
    settings = MeasureSettings.create(("diag", "block"))
    try:
        plan = cost.plan(prepared, settings, inputs, 48, exact_only="keep_blocks=True")
        assert plan.sketch is None
        assert plan.notes and "measured exactly although it needs" in plan.notes[0]
        assert cost.plan(prepared, settings, inputs, 48).sketch is not None
    finally:
        prepared.close()


def test_monte_carlo_fisher_is_measured_as_asked():
    model, inputs, targets = wide_classifier(classes=600, n=48)
    m = measure(model, nn.CrossEntropyLoss(), inputs, targets, fisher="mc", mc_samples=2)
    assert "estimator" not in m.settings
    assert "block/direction_cosine/all" in m.scalars
    assert not any(keys.parse_key(k).stderr for k in m.scalars if keys.parse_key(k))


def test_sketch_with_directions_and_absolute_damping():
    """Directions: diag plug-in, no block natural-gradient; absolute λ: EF side exact."""
    model, inputs, targets, loss = classifier_problem()
    m = run(model, loss, inputs, targets, keep_directions=True, damping_mode="absolute")
    assert set(m.directions["diag"][0]) == set(m.layer_names)
    assert m.directions["block"][0] == {}
    exact = run(model, loss, inputs, targets, estimator="exact", damping_mode="absolute")
    for metric in ("ef_projection", "ef_grad_cosine", "ef_projection_per_sample", "damping"):
        key = f"block/{metric}/all"
        assert m[key] == pytest.approx(exact[key], rel=1e-9)
        assert keys.stderr_key("block", metric, "all") not in m.scalars


def test_kron_alone_stays_exact():
    """No estimator for the only structure asked for: the exact Fisher, however many classes."""
    model, inputs, targets = wide_classifier(classes=600, n=16)
    prepared = prepare(model, resolve_loss(nn.CrossEntropyLoss()), "backpack")
    try:
        settings = MeasureSettings.create(("kron",))
        plan = cost.plan(prepared, settings, inputs, 16, exact_only="no estimator for kron")
        assert plan.sketch is None
        both = MeasureSettings.create(("diag", "block", "kron"))
        assert cost.plan(prepared, both, inputs, 16).sketch is not None
    finally:
        prepared.close()
    m = run(model, nn.CrossEntropyLoss(), inputs, targets, estimator="auto", structures=("kron",))
    assert "estimator" not in m.settings
    assert "kron/trace_ratio/all" in m.scalars


def test_sequence_model_with_a_large_vocabulary_is_estimated():
    """A tagger over 2000 classes and 6 positions (R_n = 11,994) on torch.func: sketched."""
    torch.manual_seed(0)
    model = sequence_model(classes=2000)
    tokens = torch.randint(0, 7, (4, 6))
    targets = torch.randint(0, 2000, (4, 6))
    m = run(model, nn.CrossEntropyLoss(), tokens, targets, estimator="auto", backend="functorch")
    assert m.settings["estimator"]["exact_columns_per_sample"] == 1999 * 6
    assert {e["backend"] for e in m.coverage} == {"functorch"}
    value, stderr = m["block/trace_ratio/all"], m["block/trace_ratio_se/all"]
    assert math.isfinite(value) and 0 < stderr < value


def test_a_forced_sketch_refuses_what_it_cannot_estimate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match="cannot be used here: no estimator for kron"):
        measure(model, "cross_entropy", x, y, structures=("kron",), estimator="sketch")
    with pytest.raises(ValueError, match="keep_blocks=True returns the exact dense blocks"):
        measure(model, "cross_entropy", x, y, estimator="sketch", keep_blocks=True)
