"""Verdict sentences and levels from synthetic runs: each threshold on both sides."""

from __future__ import annotations

from pathlib import Path

import pytest

from fisher_monitor.report.load import Run
from fisher_monitor.report.verdict import headline, layer_table, verdicts, worst_layer, worst_step


def run_with(cosines, layer_cosines=None, ratios=None, errors=None) -> Run:
    steps = list(range(0, 10 * len(cosines), 10))
    scalars = {"block/direction_cosine/all": list(zip(steps, cosines, strict=True))}
    for layer, values in (layer_cosines or {}).items():
        scalars[f"block/direction_cosine/{layer}"] = list(zip(steps, values, strict=True))
    if ratios is not None:
        scalars["block/trace_ratio/all"] = list(zip(steps, ratios, strict=True))
    if errors is not None:
        scalars["block/rel_error/all"] = list(zip(steps, errors, strict=True))
        scalars["block/kl/all"] = [(s, 1.0) for s in steps]
    return Run(name="synthetic", path=Path("."), prefix="fisher", scalars=scalars)


def test_disagreement_in_most_measurements_is_bad_and_names_the_worst_layer():
    run = run_with(
        [0.1, 0.2, 0.3, 0.95], {"fc1": [0.9, 0.9, 0.9, 0.9], "fc2": [0.1, 0.0, 0.2, 0.1]}
    )
    verdict = headline(run)
    assert verdict.level == "bad"
    assert "in 75% of 4 measurements" in verdict.text and "worst in layer `fc2`" in verdict.text
    assert verdict.numbers["disagree_share"] == 0.75
    assert worst_layer(run) == ("fc2", pytest.approx(0.1))
    assert worst_step(run) == 0


def test_agreement_and_mixed():
    assert headline(run_with([0.95] * 9 + [0.6])).level == "good"
    assert headline(run_with([0.95] * 8 + [0.6, 0.6])).level == "mixed"  # 80% < 90% agreement
    assert headline(run_with([0.4] * 4 + [0.95] * 6)).level == "mixed"  # 40% < 50% disagreement


def test_scale_matrix_and_hidden_trace_mismatch():
    run = run_with([0.95] * 4, ratios=[1.0, 1.1, 0.9, 1.05], errors=[0.8, 0.9, 0.7, 0.85])
    by_topic = {v.topic: v for v in verdicts(run)}
    assert by_topic["scale"].level == "good"
    assert by_topic["matrix"].level == "bad" and "differ by 82%" in by_topic["matrix"].text
    assert by_topic["trace"].level == "bad" and "hides this mismatch" in by_topic["trace"].text
    run = run_with([0.95] * 4, ratios=[3.0, 4.0, 2.5, 5.0], errors=[0.1] * 4)
    by_topic = {v.topic: v for v in verdicts(run)}
    assert by_topic["scale"].level == "bad" and "overstates" in by_topic["scale"].text
    assert by_topic["matrix"].level == "good" and "trace" not in by_topic


def test_layer_table_reads_values_at_a_step():
    run = run_with([0.5, 0.7], {"fc1": [0.2, 0.3]})
    rows = {row["layer"]: row for row in layer_table(run, 10)}
    assert rows["fc1"]["direction_cosine"] == 0.3 and rows["all"]["direction_cosine"] == 0.7
