"""Sketched metrics of every structure against their definition, rebuilt from first principles.

The definition test (:func:`test_sketched_metrics_match_the_dense_definition`) rebuilds the
estimator on tiny float64 models: the sketched columns ``J_nᵀ S_n w / √(N k)`` from
torch.func Jacobians and the same Rademacher signs, dense ``D × D`` group estimates
``F̂_g``, every replicate's metrics with explicit inverses, and the jackknife written out;
the engine must agree to rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import reference
from cases import make_problem
from fisher_monitor import keys
from fisher_monitor.engine import cost
from fisher_monitor.likelihoods import rademacher
from sketch_cases import (
    FISHER_INVERSE,
    classifier_problem,
    run,
    sequence_problem,
)


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
    # the sketch's own estimates (the exact-Fisher solves of block's Fisher-inverse metrics
    # are tested in tests/structures/block/test_exact_solves_block.py)
    m = run(model, loss, inputs, targets, seed=7, backend=backend, solves=None)
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
