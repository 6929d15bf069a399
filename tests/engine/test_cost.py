"""The cost model: the exact Fisher while affordable, the sketch beyond, with the reasons."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from fisher_monitor import keys, measure
from fisher_monitor.backends import prepare
from fisher_monitor.engine import cost
from fisher_monitor.engine.profile import profile
from fisher_monitor.likelihoods import resolve_loss
from fisher_monitor.settings import MeasureSettings
from fisher_monitor.validation import format_bytes
from sketch_cases import classifier_problem, run, sequence_model, wide_classifier


def test_small_problems_stay_exact_with_identical_numbers():
    model, inputs, targets, loss = classifier_problem()
    auto = run(model, loss, inputs, targets, estimator="auto")
    exact = run(model, loss, inputs, targets, estimator="exact")
    assert auto.scalars == exact.scalars
    assert "estimator" not in auto.settings
    assert all(entry["estimator"] == {"diag": "exact", "block": "exact"} for entry in auto.coverage)
    assert not any(keys.parse_key(k).stderr for k in auto.scalars if keys.parse_key(k))


def test_many_classes_switch_to_the_sketch_and_say_so():
    """R = 1999·64 exact columns: the cost model estimates, with notes, coverage, settings."""
    model, inputs, targets = wide_classifier()
    loss = nn.CrossEntropyLoss()
    structures = ("diag", "block", "kron")
    # without the exact-Fisher solves (tests/engine/test_exact_solves.py has them)
    m = run(model, loss, inputs, targets, estimator="auto", structures=structures, solves=None)
    assert m.settings["estimator"]["method"] == "sketch"
    assert m.settings["estimator"]["exact_columns_per_sample"] == 1999
    assert m.settings["estimator"]["forced"] is False
    expected = {"diag": "sketch", "block": "sketch", "kron": None}
    assert all(e["estimator"] == expected for e in m.coverage)
    text = " ".join(m.notes)
    assert "1,999 square-root columns per sample" in text
    assert "estimated from 6 sketched columns per sample in 6 replicate groups" in text
    assert "block: direction_cosine, kl, nat_grad_cosine, nat_projection" in text
    assert "smaller probe_size does not make the exact path fit" in text
    assert "keeps 1,999 columns per sample" in text
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
        columns = profile(prepared, inputs).fisher_columns(prepared)
        plan = cost.plan(prepared, settings, profile(prepared, inputs), 32, memory_budget=10**12)
        assert plan.sketch is None and columns == 39
        tight = plan.estimated.peak_bytes + 1
        plan = cost.plan(prepared, settings, profile(prepared, inputs), 32, memory_budget=tight)
        assert plan.sketch is not None
        budget = re.escape(f"(budget {format_bytes(tight)})")
        assert re.search(rf"would need \d+\.\d (KiB|MiB) {budget}", plan.reason), plan.reason
        assert plan.pass_columns == plan.sketch.columns + 1
    finally:
        prepared.close()


def test_exact_only_requests_keep_the_exact_fisher_with_a_note():
    model, inputs, targets = wide_classifier(classes=600, n=48)
    prepared = prepare(model, resolve_loss(nn.CrossEntropyLoss()), "backpack")
    settings = MeasureSettings.create(("diag", "block"))
    try:
        plan = cost.plan(
            prepared, settings, profile(prepared, inputs), 48, exact_only="keep_blocks=True"
        )
        assert plan.sketch is None
        assert plan.notes and "measured exactly although it needs" in plan.notes[0]
        assert cost.plan(prepared, settings, profile(prepared, inputs), 48).sketch is not None
    finally:
        prepared.close()


def test_monte_carlo_fisher_is_measured_as_asked():
    model, inputs, targets = wide_classifier(classes=600, n=48)
    m = measure(model, nn.CrossEntropyLoss(), inputs, targets, fisher="mc", mc_samples=2)
    assert "estimator" not in m.settings
    assert "block/direction_cosine/all" in m.scalars
    assert not any(keys.parse_key(k).stderr for k in m.scalars if keys.parse_key(k))


def test_sketch_with_directions_and_absolute_damping():
    """Directions: diag plug-in, block from the exact-Fisher solves; absolute λ: EF side exact."""
    model, inputs, targets, loss = classifier_problem()
    m = run(model, loss, inputs, targets, keep_directions=True, damping_mode="absolute")
    assert set(m.directions["diag"][0]) == set(m.layer_names)
    exact = run(
        model,
        loss,
        inputs,
        targets,
        estimator="exact",
        damping_mode="absolute",
        keep_directions=True,
    )
    assert set(m.directions["block"][0]) == set(m.layer_names)
    for name, (natural, empirical) in m.directions["block"][0].items():
        want_natural, want_empirical = exact.directions["block"][0][name]
        torch.testing.assert_close(natural, want_natural, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(empirical, want_empirical, rtol=1e-8, atol=1e-12)
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
        plan = cost.plan(
            prepared, settings, profile(prepared, inputs), 16, exact_only="no estimator for kron"
        )
        assert plan.sketch is None
        both = MeasureSettings.create(("diag", "block", "kron"))
        assert cost.plan(prepared, both, profile(prepared, inputs), 16).sketch is not None
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
    m = run(
        model,
        nn.CrossEntropyLoss(),
        tokens,
        targets,
        estimator="auto",
        backend="functorch",
        solves=None,
    )
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


def test_a_small_convolution_on_many_samples_stays_exact():
    """A 12-parameter ``Conv1d`` on 3000 samples: its D × D dense route costs almost nothing;
    the cost model used to charge it the R³ factorisation of the Gram route (3.2e+07 steps)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 3, 3), nn.Flatten(), nn.Linear(18, 2))
    model[2].requires_grad_(False)
    inputs = torch.randn(3000, 1, 8)
    prepared = prepare(model, resolve_loss("cross_entropy"), "backpack")
    try:
        plan = cost.plan(
            prepared, MeasureSettings.create(("diag", "block")), profile(prepared, inputs), 3000
        )
        assert plan.sketch is None and plan.steps(plan.exact) < 100
    finally:
        prepared.close()


def test_the_sketch_estimate_counts_only_what_the_sketch_runs():
    """With kron asked for, the sketched measurement leaves kron out, and so does its cost
    (it used to count kron's factorisations of the exact R, orders of magnitude too high)."""
    model, inputs, targets = wide_classifier(classes=600, n=48)
    prepared = prepare(model, resolve_loss(nn.CrossEntropyLoss()), "backpack")
    try:
        network = profile(prepared, inputs)
        plans = [
            cost.plan(prepared, MeasureSettings.create(names), network, 48)
            for names in (("diag", "block"), ("diag", "block", "kron"))
        ]
    finally:
        prepared.close()
    assert all(plan.sketch is not None for plan in plans)
    assert plans[0].estimated.flops == plans[1].estimated.flops
    assert plans[1].skipped == ["kron"]
