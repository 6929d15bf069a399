"""Exact-Fisher solves under a sketch: headline metrics, notes, cost, budget, failures."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fisher_monitor import keys, measure
from fisher_monitor.backends import prepare
from fisher_monitor.engine import cost, exact_solves
from fisher_monitor.engine.exact_solves import SolveSettings
from fisher_monitor.engine.profile import NetworkProfile, profile
from fisher_monitor.engine.solve_settings import PlannedLayer, SolveMeter, planned_solves
from fisher_monitor.factors import LayerShape
from fisher_monitor.likelihoods import resolve_loss
from fisher_monitor.settings import MeasureSettings
from lightning_helpers import SpyLogger, TinyClassifier, fit
from sketch_cases import classifier_problem, run, sequence_model

HEADLINE = ("direction_cosine", "nat_grad_cosine", "kl", "nat_projection")


def _assert_headline(m, layers):
    for layer in [*layers, "all"]:
        for metric in HEADLINE:
            key = keys.metric_key("block", metric, layer)
            assert key in m.scalars, key
            assert math.isfinite(m[key]), key


def test_the_notes_settings_and_cost_say_how_the_metrics_were_obtained():
    """Small layers: every quantity exact from D_b products (no probes, so no KL SE)."""
    model, inputs, targets, loss = classifier_problem(n=8, classes=12)
    m = run(model, loss, inputs, targets, damping_mode="absolute")
    _assert_headline(m, m.layer_names)
    solves = m.settings["estimator"]["exact_solves"]
    assert solves["products"] > 0 and solves["layers"] == 2 and solves["seconds"] > 0
    assert solves["tolerance"] == 1e-6
    assert m.settings["estimator"]["exact_solves_cost_steps"] > 0
    text = " ".join(m.notes)
    assert "from the exact Fisher by matrix-free solves" in text
    assert "need (F + λI)⁻¹" not in text and "smaller probe_size" not in text
    assert keys.stderr_key("block", "kl", "all") not in m.scalars
    exact = run(model, loss, inputs, targets, estimator="exact", damping_mode="absolute")
    for metric in HEADLINE:
        key = f"block/{metric}/all"
        assert m[key] == pytest.approx(exact[key], rel=1e-9, abs=1e-12)


def test_krylov_solves_report_their_error_bound_and_the_kl_its_standard_error():
    model, inputs, targets, loss = classifier_problem(n=8, classes=12)
    settings = SolveSettings(dense_limit=0, exact_head=False)
    m = run(model, loss, inputs, targets, damping_mode="absolute", solves=settings)
    _assert_headline(m, m.layer_names)
    solves = m.settings["estimator"]["exact_solves"]
    assert 0 < solves["error_bound"] < 1e-2 and solves["max_iterations_used"] > 1
    assert m[keys.stderr_key("block", "kl", "all")] > 0
    # A⁻¹g is deterministic up to the tolerance: no standard error under absolute damping
    assert keys.stderr_key("block", "direction_cosine", "all") not in m.scalars
    assert "largest bound on the relative error of A⁻¹g" in " ".join(m.notes)


def test_solves_over_their_budget_are_left_out_with_the_reason():
    model, inputs, targets, loss = classifier_problem(n=8, classes=12)
    settings = SolveSettings(budget_steps=0.01, floor_flops=0.0)  # they plan ~0.4 steps
    m = run(model, loss, inputs, targets, solves=settings)
    assert not any(f"block/{metric}/all" in m.scalars for metric in HEADLINE)
    text = " ".join(m.notes)
    assert "the exact-Fisher solves would need about" in text
    assert "(solve_budget 0.01; a larger solve_budget runs them)" in text
    assert "A smaller probe_size does not make the exact path fit" in text
    assert "exact_solves" not in m.settings["estimator"]


def test_a_zero_solve_budget_never_solves_and_an_infinite_one_always_does():
    model, inputs, targets, loss = classifier_problem(n=8, classes=12)
    common = dict(estimator="sketch", generator=torch.Generator().manual_seed(0))
    never = measure(model, loss, inputs, targets, solve_budget=0, **common)
    assert not any(f"block/{metric}/all" in never.scalars for metric in HEADLINE)
    assert "(solve_budget 0; a larger solve_budget runs them)" in " ".join(never.notes)
    always = measure(model, loss, inputs, targets, solve_budget=math.inf, **common)
    _assert_headline(always, always.layer_names)
    assert "budget_steps" not in always.settings["estimator"]["exact_solves"]  # unmetered


class _SlowFunction:
    """A stand-in network function whose products take 2 ms per vector."""

    device = torch.device("cpu")

    def synchronize(self):
        pass

    def operator(self, names, lane_bytes):
        def apply(vectors):
            time.sleep(0.002 * vectors.shape[0])
            return vectors

        return apply


def test_the_projection_times_one_batch_of_products_per_layer():
    model, inputs, targets, loss = classifier_problem(n=8, classes=12)
    m = run(model, loss, inputs, targets, estimator="exact")
    requests = {}
    for name, size in (("a", 30), ("b", 50)):
        info = SimpleNamespace(parameter_names=[f"{name}.weight"])
        requests[name] = SimpleNamespace(
            gradient=torch.zeros(size), per_sample=torch.zeros(8, size), info=info
        )
    planned = {"a": PlannedLayer(100, 1.0), "b": PlannedLayer(1000, 1.0)}
    settings = SolveSettings()
    seconds = SolveMeter.projected_seconds(_SlowFunction(), requests, planned, settings)
    # 1100 products of 2 ms (sleep only oversleeps; the interpreter adds a little)
    assert 2.2 <= seconds <= 2.2 * 1.5
    # it stops timing once past the budget: layer b is not timed
    assert SolveMeter.projected_seconds(
        _SlowFunction(), requests, planned, settings, budget_seconds=0.1
    ) == pytest.approx(0.2, rel=0.5)
    assert m.layer_names  # the problem is the one the other tests solve


def test_solves_projected_past_their_budget_are_left_out_with_their_measured_cost(monkeypatch):
    """The plan lets them run (its floor is 0, its budget 500,000 steps); the timed products
    project past the budget, so nothing is solved and the note gives the measured cost."""
    model, inputs, targets, loss = classifier_problem(n=8, classes=12)
    monkeypatch.setattr(SolveMeter, "projected_seconds", staticmethod(lambda *a, **k: 1e9))
    settings = SolveSettings(budget_steps=5e5, floor_flops=0.0)
    m = run(model, loss, inputs, targets, solves=settings)
    for layer in [*m.layer_names, "all"]:
        for metric in HEADLINE:
            assert keys.metric_key("block", metric, layer) not in m.scalars
    assert "block/trace_ratio/all" in m.scalars  # the sketch's own metrics stay
    text = " ".join(m.notes)
    assert "at the measured pace of their Fisher-vector products" in text
    assert "solve_budget 500,000; a larger solve_budget runs them" in text
    solves = m.settings["estimator"]["exact_solves"]
    assert solves["left_out"] == "over budget" and solves["products"] == 0
    assert solves["projected_steps"] > 5e5 and solves["budget_steps"] == 5e5


def test_solves_that_run_out_of_their_budget_keep_only_the_layers_they_finished(monkeypatch):
    """Projected within the budget, they take longer: the first layer finishes in time, then
    the clock jumps past the budget; that layer keeps its metrics, the other and ``all``
    leave them out."""
    model, inputs, targets, loss = classifier_problem(n=8, classes=12)
    now = {"seconds": 0.0}

    class Meter(SolveMeter):
        projected_seconds = staticmethod(lambda *args, **kwargs: 0.0)

        def __init__(self, budget_seconds):
            super().__init__(budget_seconds, clock=lambda: now["seconds"])

    solve = exact_solves._solve

    def solve_then_late(*args, **kwargs):
        solved = solve(*args, **kwargs)
        now["seconds"] = 1e9
        return solved

    monkeypatch.setattr(exact_solves, "SolveMeter", Meter)
    monkeypatch.setattr(exact_solves, "_solve", solve_then_late)
    settings = SolveSettings(budget_steps=1e6, floor_flops=0.0, exact_head=False)
    m = run(model, loss, inputs, targets, solves=settings)
    solves = m.settings["estimator"]["exact_solves"]
    assert solves["layers"] == 1 and len(solves["stopped"]) == 1
    (stopped,) = solves["stopped"]
    for layer in m.layer_names:
        for metric in HEADLINE:
            present = keys.metric_key("block", metric, layer) in m.scalars
            assert present == (layer != stopped), (layer, metric)
    assert not any(f"block/{metric}/all" in m.scalars for metric in HEADLINE)
    text = " ".join(m.notes)
    assert "the exact-Fisher solves ran out of their budget" in text
    assert f"left out for {stopped} and for all" in text


def test_unconverged_solves_leave_their_metrics_out_rather_than_report_them_wrong():
    model, inputs, targets, loss = classifier_problem(n=8, classes=12)
    settings = SolveSettings(dense_limit=0, dense_fallback=0, max_iterations=2, exact_head=False)
    m = run(model, loss, inputs, targets, solves=settings)
    for metric in HEADLINE:
        assert f"block/{metric}/all" not in m.scalars
    assert "block/trace_ratio/all" in m.scalars  # the sketch's own metrics stay
    text = " ".join(m.notes)
    assert "conjugate gradients did not reach relative residual 1e-06 within 2 products" in text
    assert "kl is left out there and for all" in text


def test_a_layer_whose_conjugate_gradients_stall_is_solved_densely_where_it_fits():
    """Two products are far too few; the layers (≤ ``dense_fallback``) are solved densely
    instead, so the metrics equal the exact path's (absolute damping: the same λ)."""
    model, inputs, targets, loss = classifier_problem(n=8, classes=12)
    settings = SolveSettings(dense_limit=0, max_iterations=2, exact_head=False)
    common = dict(damping=1e-3, damping_mode="absolute")
    exact = run(model, loss, inputs, targets, estimator="exact", **common)
    m = run(model, loss, inputs, targets, solves=settings, **common)
    for metric in HEADLINE:
        key = f"block/{metric}/all"
        assert m[key] == pytest.approx(exact[key], rel=1e-7), key
    assert not any("did not reach relative residual" in note for note in m.notes)


def test_the_plan_counts_the_solves_and_keeps_the_exact_path_where_it_is_cheaper():
    model, inputs, targets, loss = classifier_problem(n=8, classes=12)
    prepared = prepare(model, resolve_loss(loss), "backpack")
    settings = MeasureSettings.create(("diag", "block"))
    try:
        network = profile(prepared, inputs)
        with_solves = cost.plan(prepared, settings, network, 8, estimator="sketch")
        without = cost.plan(prepared, settings, network, 8, estimator="sketch", solves=None)
        assert with_solves.solves > 0 and without.solves == 0
        assert with_solves.estimated.flops == pytest.approx(
            without.estimated.flops + with_solves.solves
        )
        assert any(getattr(s, "exact_solves", False) for s in with_solves.structures)
        assert not any(getattr(s, "exact_solves", False) for s in without.structures)
        # this small problem: exact is cheaper than sketch + solves, so auto stays exact
        assert cost.plan(prepared, settings, network, 8).sketch is None
    finally:
        prepared.close()


@pytest.mark.slow
def test_every_headline_metric_for_a_1000_class_head_with_auto():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 1000))
    inputs, targets = torch.randn(20, 6), torch.randint(0, 1000, (20,))
    m = run(model, nn.CrossEntropyLoss(), inputs, targets, estimator="auto")
    assert m.settings["estimator"]["method"] == "sketch"
    _assert_headline(m, m.layer_names)
    assert m[keys.stderr_key("block", "kl", "all")] > 0
    assert 0 < m["block/direction_cosine_se/all"] < 0.5  # the damping's noise


@pytest.mark.slow
def test_every_headline_metric_for_a_vocabulary_of_2000_with_auto():
    """Embedding → Linear over 6 positions and 2000 classes, outputs ``(N, C, T)``."""
    torch.manual_seed(0)
    model = sequence_model(classes=2000)
    tokens, targets = torch.randint(0, 7, (4, 6)), torch.randint(0, 2000, (4, 6))
    m = run(model, nn.CrossEntropyLoss(), tokens, targets, estimator="auto", backend="functorch")
    assert m.settings["estimator"]["method"] == "sketch"
    assert m.settings["estimator"]["exact_columns_per_sample"] == 1999 * 6
    _assert_headline(m, m.layer_names)


def test_the_callback_logs_the_headline_metrics_of_a_sketched_fit():
    """``FisherMonitor(estimator="sketch")`` in a real ``Trainer.fit``."""
    from fisher_monitor import FisherMonitor

    monitor = FisherMonitor(every_n_steps=2, structures=("block",), estimator="sketch")
    logger = SpyLogger()
    fit(monitor, steps=3, logger=logger, model=TinyClassifier(hidden=4))
    tags = [key for _, metrics in logger.calls for key in metrics]
    for metric in HEADLINE:
        assert any(tag.endswith(f"block/{metric}/all") for tag in tags), metric


class Encoder(nn.Module):
    """An embedding, a transformer encoder layer with dropout 0.5, a head over 12 tokens."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.block = nn.TransformerEncoderLayer(
            8, 2, dim_feedforward=16, dropout=0.5, batch_first=True
        )
        self.head = nn.Linear(8, 12)

    def forward(self, tokens):
        return self.head(self.block(self.embed(tokens))).transpose(1, 2)


def test_a_network_whose_masks_differ_under_transforms_leaves_the_metrics_out(monkeypatch):
    """Attention's dropout draws other masks under torch.func's transforms than in the pass
    (``nn.Dropout``'s do not): products would mix them, so nothing is solved and the four
    metrics are left out with a note; the plan sees it and does not count the solves;
    without dropout the same network is solved."""
    torch.manual_seed(0)
    model = Encoder().double()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 11, (4, 5), generator=generator)
    targets = torch.randint(0, 12, (4, 5), generator=generator)
    loss = nn.CrossEntropyLoss()
    m = run(model, loss, tokens, targets, backend="autograd")
    for metric in HEADLINE:
        assert f"block/{metric}/all" not in m.scalars
    assert "block/trace_ratio/all" in m.scalars
    text = " ".join(m.notes)
    assert "draws random masks in train mode (block.self_attn: attention dropout 0.5)" in text
    assert "exact_solves" not in m.settings["estimator"]  # planned out: none ran
    assert m.settings["estimator"].get("exact_solves_cost_steps", 0) == 0
    # the check when the solves start (attention the plan cannot see: functional code)
    with monkeypatch.context() as patched:
        patched.setattr(cost, "random_attention", lambda network: None)
        m = run(model, loss, tokens, targets, backend="autograd")
    for metric in HEADLINE:
        assert f"block/{metric}/all" not in m.scalars
    assert any("random masks in train mode (dropout)" in note for note in m.notes)
    assert m.settings["estimator"]["exact_solves"]["left_out"] == "random masks in train mode"
    for module in model.modules():  # no randomness: the same network is solved
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.block.self_attn.dropout = 0.0
    m = run(model, loss, tokens, targets, backend="autograd")
    for metric in HEADLINE:
        assert f"block/{metric}/all" in m.scalars


def _shape(name, inputs, outputs, positions=1):
    return LayerShape(
        name,
        "outer",
        positions,
        inputs,
        outputs,
        inputs * outputs,
        positions * outputs,
        2.0 * positions * inputs * outputs,
    )


def test_the_plan_folds_the_loss_through_a_wide_head():
    """Below a 1000-class head, a product costs the hidden layer's passes plus ``I²`` per
    sample for the folded loss-Hessian, not the head's ``2·I·C`` forward."""
    hidden, head = _shape("hidden", 65, 64), _shape("head", 65, 1000)
    settings = SolveSettings(dense_limit=0)
    plan = planned_solves(NetworkProfile((hidden, head), 4), 8, 1, settings)
    per_product = (plan["hidden"].flops - 300 * 8 * (hidden.forward_flops + 65**2)) / plan[
        "hidden"
    ].products
    expected = 3.0 * 8 * (hidden.forward_flops + 65**2) + 10.0 * hidden.dimension
    assert per_product == pytest.approx(expected)
    # a narrow last layer (a regression output) is not folded: its forward counts
    narrow = _shape("out", 65, 3)
    plain = planned_solves(NetworkProfile((hidden, narrow), 4), 8, 1, settings)
    forward = hidden.forward_flops + narrow.forward_flops
    assert plain["hidden"].flops == pytest.approx(
        plain["hidden"].products * (3.0 * 8 * forward + 10.0 * hidden.dimension) + 300 * 8 * forward
    )
