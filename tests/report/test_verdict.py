"""Verdict sentences and levels from synthetic runs: each threshold on both sides, evidence."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from fisher_monitor.report.load import Run
from fisher_monitor.report.verdict import (
    Code,
    advice,
    headline,
    range_phrase,
    share_phrase,
    verdicts,
    worst_layer,
    worst_step,
)


def run_with(
    cosines, layer_cosines=None, ratios=None, errors=None, steps=None, extra=None, settings=None
) -> Run:
    steps = list(range(0, 10 * len(cosines), 10)) if steps is None else steps
    scalars = {"block/direction_cosine/all": list(zip(steps, cosines, strict=True))}
    for layer, values in (layer_cosines or {}).items():
        scalars[f"block/direction_cosine/{layer}"] = list(zip(steps, values, strict=True))
    if ratios is not None:
        scalars["block/trace_ratio/all"] = list(zip(steps, ratios, strict=True))
    if errors is not None:
        scalars["block/rel_error/all"] = list(zip(steps, errors, strict=True))
        scalars["block/kl/all"] = [(s, 1.0) for s in steps]
    for key, values in (extra or {}).items():
        scalars[key] = list(zip(steps, values, strict=True))
    return Run(
        name="synthetic", path=Path("."), prefix="fisher", scalars=scalars, settings=settings or {}
    )


def by_topic(run):
    return {verdict.topic: verdict for verdict in verdicts(run)}


def test_disagreement_in_most_measurements_is_bad_and_names_the_worst_layer():
    run = run_with(
        [0.1, 0.2, 0.3, 0.95, 0.2],
        {"fc1": [0.9, 0.9, 0.9, 0.9, 0.9], "fc2": [0.1, 0.0, 0.2, 0.1, 0.3]},
    )
    verdict = headline(run)
    assert verdict.level == "bad"
    assert "in 4 of 5 measurements" in verdict.text and "worst in layer `fc2`" in verdict.text
    assert Code("fc2") in verdict.parts  # the layer name is a code part, never markup
    assert verdict.numbers["disagree_share"] == 0.8
    assert worst_layer(run) == ("fc2", pytest.approx(0.1))
    assert worst_step(run) == 0


def test_agreement_and_mixed():
    assert headline(run_with([0.95] * 9 + [0.6])).level == "good"
    assert headline(run_with([0.95] * 8 + [0.6, 0.6])).level == "mixed"  # 80% < 90% agreement
    assert headline(run_with([0.4] * 4 + [0.95] * 6)).level == "mixed"  # 40% < 50% disagreement


def test_scale_matrix_and_hidden_trace_mismatch():
    run = run_with(
        [0.95] * 5, ratios=[1.0, 1.1, 0.9, 1.05, 1.0], errors=[0.8, 0.9, 0.7, 0.85, 0.82]
    )
    topics = by_topic(run)
    assert topics["scale"].level == "good"
    assert topics["matrix"].level == "bad" and "differed by 82%" in topics["matrix"].text
    assert topics["trace"].level == "bad"
    assert topics["trace"].text.startswith("The trace hides a mismatch")
    run = run_with([0.95] * 5, ratios=[3.0, 4.0, 2.5, 5.0, 3.0], errors=[0.1] * 5)
    topics = by_topic(run)
    assert topics["scale"].level == "bad" and "overstates" in topics["scale"].text
    assert topics["matrix"].level == "good"
    # the trace verdict is always given where both numbers exist, saying whether it misleads
    assert topics["trace"].level == "good" and "does not hide a mismatch" in topics["trace"].text


def test_verdicts_end_with_what_to_do():
    """Issue 10, item 3: every verdict sentence ends with an action."""
    runs = [
        run_with([0.1] * 6, ratios=[1.0] * 6, errors=[0.9] * 6),
        run_with([0.95] * 6, ratios=[3.0] * 6, errors=[0.1] * 6),
        run_with([0.95] * 6 + [0.2] * 4, ratios=[0.2] * 10, errors=[0.3] * 10),
        run_with([0.5], ratios=[1.0], errors=[0.9], steps=[0]),
    ]
    actions = re.compile(
        r"\b(use|do not|no change needed|check|measure|precondition|consider|still judge|"
        r"are safe)\b"
    )
    seen = set()
    for run in runs:
        for verdict in verdicts(run):
            seen.add((verdict.topic, verdict.level))
            last_clause = verdict.text.rsplit(": ", 1)[-1]
            assert actions.search(last_clause), verdict.text
            assert verdict.text.endswith("."), verdict.text
    assert {"bad", "good", "mixed", "insufficient"} <= {level for _, level in seen}


def test_one_measurement_at_step_zero_is_insufficient_evidence():
    """Issue 10, item 3: the 132-step CNN case (one point, untrained network)."""
    run = run_with([0.93], ratios=[1.03], errors=[0.2], steps=[0])
    found = verdicts(run)
    assert {v.topic for v in found} == {"preconditioning", "matrix", "scale", "trace"}
    for verdict in found:
        assert verdict.level == "insufficient"
        assert verdict.text.startswith("Insufficient evidence")
        assert "1 measurement, at step 0, before any training step" in verdict.text
        assert "schedules.budget" in verdict.text  # what to change
    scale = by_topic(run)["scale"]
    assert "tr EF / tr F was 1.03" in scale.text  # a single point is not a range
    assert "ranged" not in scale.text and "100%" not in scale.text
    tips = advice(run, found)
    assert tips and "1 measurement (at step 0)" in tips[0]


def test_few_measurements_after_training_are_still_insufficient():
    run = run_with([0.1, 0.2, 0.15], ratios=[1.03, 1.05, 1.07], errors=[0.2] * 3)
    topics = by_topic(run)
    assert topics["preconditioning"].level == "insufficient"
    assert "only 3 measurements (at steps 0–20; at least 5 are needed)" in topics["scale"].text
    assert "ranged from 1.03 to 1.07 (median 1.05)" in topics["scale"].text
    assert headline(run_with([0.1] * 5)).level == "bad"  # five measurements are enough


def test_small_counts_read_naturally():
    assert share_phrase(1, 3) == "in 1 of 3 measurements"
    assert share_phrase(3, 3) == "in all 3 measurements"
    assert share_phrase(0, 4) == "in none of the 4 measurements"
    assert share_phrase(29, 240) == "in 12% of 240 measurements"
    assert range_phrase(np.array([1.03])) == "was 1.03"
    assert range_phrase(np.array([1.03, 1.03])) == "was 1.03 in every measurement"
    assert range_phrase(np.array([1.03, 1.07, 1.05])) == "ranged from 1.03 to 1.07 (median 1.05)"


def optimizer_run(nat, ef_pre, f_pre, name="AdamW"):
    count = len(nat)
    return run_with(
        [0.9] * count,
        extra={
            "block/update_nat_cosine/all": nat,
            "block/update_ef_cosine/all": [0.8] * count,
            "block/update_grad_cosine/all": [0.3] * count,
            "optimizer/preconditioner_ef_cosine/all": ef_pre,
            "optimizer/preconditioner_fisher_cosine/all": f_pre,
        },
        settings={"optimizer": name} if name else {},
    )


def test_optimizer_verdict_names_the_optimizer_and_what_its_preconditioner_follows():
    """Issue 13, item 4."""
    run = optimizer_run([0.2, 0.3, 0.6, 0.1, 0.2, 0.25, 0.15, 0.2], [0.93] * 8, [0.41] * 8)
    verdict = by_topic(run)["optimizer"]
    assert verdict.level == "bad"
    assert verdict.text.startswith(
        "AdamW's steps pointed within 60° of the natural gradient (cosine ≥ 0.5) in 1 of 8 "
        "measurements (median cosine 0.20"
    )
    assert "correlates with √diag EF at 0.93 and with √diag F at 0.41 — it follows the EF" in (
        verdict.text
    )
    assert "precondition with the Fisher" in verdict.text
    assert verdict.numbers["within_60_degrees_share"] == 1 / 8
    assert verdict.numbers["follows"] == "ef"
    good = by_topic(optimizer_run([0.95] * 10, [0.5] * 10, [0.9] * 10, name=None))["optimizer"]
    assert good.level == "good" and good.text.startswith("The optimizer's steps")
    assert "it follows the Fisher" in good.text and "no change needed" in good.text


def test_no_update_keys_no_optimizer_verdict():
    assert "optimizer" not in by_topic(run_with([0.9] * 6))


def test_layer_table_reads_values_at_a_step():
    from fisher_monitor.report.render import layer_table

    run = run_with([0.5, 0.7], {"fc1": [0.2, 0.3]})
    rows = {row["layer"]: row for row in layer_table(run, 10)}
    assert rows["fc1"]["direction_cosine"] == 0.3 and rows["all"]["direction_cosine"] == 0.7
