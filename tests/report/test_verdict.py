"""Verdict sentences and levels from synthetic runs: each threshold on both sides, evidence,
the headline for each use, the structure each verdict falls back to, and no two verdicts
contradicting each other over every combination of outcomes."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest

from fisher_monitor.report.load import Run
from fisher_monitor.report.verdict import (
    LEVELS,
    Code,
    advice,
    headline,
    range_phrase,
    share_phrase,
    verdicts,
    worst_layer,
    worst_step,
)

DOCS = Path(__file__).resolve().parents[2] / "docs"


def run_with(
    cosines,
    layer_cosines=None,
    ratios=None,
    errors=None,
    steps=None,
    extra=None,
    settings=None,
    structure="block",
) -> Run:
    steps = list(range(0, 10 * len(cosines), 10)) if steps is None else steps
    scalars = {}
    if cosines is not None:
        scalars[f"{structure}/direction_cosine/all"] = list(zip(steps, cosines, strict=True))
    for layer, values in (layer_cosines or {}).items():
        scalars[f"{structure}/direction_cosine/{layer}"] = list(zip(steps, values, strict=True))
    if ratios is not None:
        scalars[f"{structure}/trace_ratio/all"] = list(zip(steps, ratios, strict=True))
    if errors is not None:
        scalars[f"{structure}/rel_error/all"] = list(zip(steps, errors, strict=True))
        scalars[f"{structure}/kl/all"] = [(s, 1.0) for s in steps]
    for key, values in (extra or {}).items():
        scalars[key] = list(zip(steps, values, strict=True))
    return Run(
        name="synthetic", path=Path("."), prefix="fisher", scalars=scalars, settings=settings or {}
    )


def by_topic(run, use=None):
    return {verdict.topic: verdict for verdict in verdicts(run, use)}


def test_disagreement_in_most_measurements_is_bad_and_names_the_worst_layer():
    run = run_with(
        [0.1, 0.2, 0.3, 0.95, 0.2],
        {"fc1": [0.9, 0.9, 0.9, 0.9, 0.9], "fc2": [0.1, 0.0, 0.2, 0.1, 0.3]},
    )
    verdict = by_topic(run)["preconditioning"]
    assert verdict.level == "bad"
    assert "in 4 of 5 measurements" in verdict.text and "worst in layer `fc2`" in verdict.text
    assert Code("fc2") in verdict.parts  # the layer name is a code part, never markup
    assert verdict.numbers["disagree_share"] == 0.8
    assert "where you use one, build it from the Fisher" in verdict.text  # conditional advice
    assert worst_layer(run) == ("fc2", pytest.approx(0.1))
    assert worst_step(run) == 0


def test_agreement_and_mixed():
    def level(cosines):
        return by_topic(run_with(cosines))["preconditioning"].level

    assert level([0.95] * 9 + [0.6]) == "good"
    assert level([0.95] * 8 + [0.6, 0.6]) == "mixed"  # 80% < 90% agreement
    assert level([0.4] * 4 + [0.95] * 6) == "mixed"  # 40% < 50% disagreement


def test_scale_matrix_and_hidden_trace_mismatch():
    run = run_with(
        [0.95] * 5, ratios=[1.0, 1.1, 0.9, 1.05, 1.0], errors=[0.8, 0.9, 0.7, 0.85, 0.82]
    )
    topics = by_topic(run)
    # the traces agree but the matrices do not: the scale is not "good" beside that
    assert topics["scale"].level == "mixed" and "only a scale for all" in topics["scale"].text
    assert topics["matrix"].level == "bad" and "differed by 82%" in topics["matrix"].text
    assert topics["trace"].level == "bad"
    assert topics["trace"].text.startswith("The trace hides a mismatch")
    run = run_with([0.95] * 5, ratios=[3.0, 4.0, 2.5, 5.0, 3.0], errors=[0.3] * 5)
    topics = by_topic(run)
    assert topics["scale"].level == "bad" and "overstates" in topics["scale"].text
    assert topics["matrix"].level == "mixed" and "rough stand-in" in topics["matrix"].text
    assert (
        topics["trace"].level == "info" and "mostly a difference of scale" in topics["trace"].text
    )
    close = by_topic(run_with([0.95] * 5, ratios=[1.0] * 5, errors=[0.05] * 5))
    assert close["matrix"].level == close["scale"].level == close["trace"].level == "good"


def test_the_400_step_contradiction_is_gone():
    """Issue 22, item 4: scale "about right … safe" beside trace "already shows the mismatch"."""
    topics = by_topic(run_with([0.3] * 8, ratios=[0.734] * 8, errors=[0.95] * 8))
    assert topics["scale"].level == "mixed"
    assert "safe" not in topics["scale"].text and "about right" not in topics["scale"].text
    assert "understates the overall curvature scale by about 27%" in topics["scale"].text
    assert topics["trace"].level == "info"  # never "good" beside a 95% matrix mismatch
    assert "understates the mismatch" in topics["trace"].text


def test_verdicts_end_with_what_to_do_and_link_the_docs():
    """Issue 10, item 3: every verdict ends with an action; issue 22: with its links."""
    runs = [
        run_with([0.1] * 6, ratios=[1.0] * 6, errors=[0.9] * 6),
        run_with([0.95] * 6, ratios=[3.0] * 6, errors=[0.1] * 6),
        run_with([0.95] * 6 + [0.2] * 4, ratios=[0.2] * 10, errors=[0.3] * 10),
        run_with([0.5], ratios=[1.0], errors=[0.9], steps=[0]),
    ]
    actions = re.compile(
        r"\b(use|do not|no change needed|check|measure|precondition|consider|judge|build)\b",
        flags=re.IGNORECASE,
    )
    seen = set()
    for run in runs:
        for verdict in [headline(run), *verdicts(run)]:
            seen.add((verdict.topic, verdict.level))
            assert actions.search(verdict.sentence.rsplit(": ", 1)[-1]), verdict.text
            assert verdict.sentence.endswith("."), verdict.text
            assert any(link.startswith("docs/glossary.md#") for link in verdict.links)
            assert verdict.text.endswith(f"(See {' and '.join(verdict.links)}.)")
    assert {"bad", "good", "mixed", "insufficient", "info"} <= {level for _, level in seen}


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
    assert by_topic(run_with([0.1] * 5))["preconditioning"].level == "bad"  # five are enough


def test_non_finite_values_are_counted_against_every_measurement_not_as_few_measurements():
    """12 measurements with 11 NaN trace ratios: the verdict says 1 of 12 gave a finite
    value and asks why the others are not finite, never to "measure at least 5 times"."""
    nan = float("nan")
    cosines = [0.1, 0.2, 0.15, 0.3, 0.2, 0.1, 0.25, 0.2, 0.1, 0.3, 0.2, 0.1]
    run = run_with(cosines, ratios=[1.05] + [nan] * 11, errors=[0.2] + [nan] * 11)
    topics = by_topic(run)
    assert topics["preconditioning"].level == "bad"  # its twelve cosines are evidence
    scale = topics["scale"]
    assert scale.level == "insufficient"
    assert "only 1 of 12 measurements gave a finite value" in scale.text
    assert "11 were NaN or infinite" in scale.text
    assert "measure at least" not in scale.text and "not finite" in scale.text
    assert scale.numbers["non_finite"] == 11
    tips = advice(run, list(topics.values()))
    assert any("NaN or infinite" in tip and "notes name the cause" in tip for tip in tips)
    assert not any("measure more often" in tip for tip in tips)
    laplace = headline(run, use="laplace")
    assert laplace.level == "insufficient" and "1 of 12 measurements" in laplace.text
    assert "measure at least" not in laplace.text
    # Few measurements, all finite: the advice stays "measure more".
    few = run_with([0.1, 0.2, 0.15], ratios=[1.03, 1.05, 1.07], errors=[0.2] * 3)
    assert any("measure more often" in tip for tip in advice(few))


def test_small_counts_read_naturally():
    assert share_phrase(1, 3) == "in 1 of 3 measurements"
    assert share_phrase(3, 3) == "in all 3 measurements"
    assert share_phrase(0, 4) == "in none of the 4 measurements"
    assert share_phrase(29, 240) == "in 12% of 240 measurements"
    assert range_phrase(np.array([1.03])) == "was 1.03"
    assert range_phrase(np.array([1.03, 1.03])) == "was 1.03 in every measurement"
    assert range_phrase(np.array([1.03, 1.07, 1.05])) == "ranged from 1.03 to 1.07 (median 1.05)"


def optimizer_run(nat, ef_pre, f_pre, name="AdamW", diag=None, grad=0.3, preconditioner=True):
    count = len(nat)
    extra = {
        "block/update_nat_cosine/all": nat,
        "block/update_ef_cosine/all": [0.8] * count,
        "block/update_grad_cosine/all": [grad] * count,
        "diag/direction_cosine/all": diag or [0.3] * count,
    }
    if ef_pre is not None:
        extra["optimizer/preconditioner_ef_cosine/all"] = ef_pre
        extra["optimizer/preconditioner_fisher_cosine/all"] = f_pre
    settings = {"optimizer": name, "preconditioner": preconditioner} if name else {}
    return run_with([0.9] * count, extra=extra, settings=settings)


def test_optimizer_verdict_names_the_optimizer_and_what_its_preconditioner_follows():
    """Issue 13, item 4."""
    run = optimizer_run([0.2, 0.3, 0.6, 0.1, 0.2, 0.25, 0.15, 0.2], [0.93] * 8, [0.41] * 8)
    verdict = by_topic(run)["optimizer"]
    assert verdict.level == "info"  # an Adam step far from the natural gradient is no fault
    assert verdict.text.startswith(
        "AdamW's steps pointed within 60° of the natural gradient (cosine ≥ 0.5) in 1 of 8 "
        "measurements (median cosine 0.20, block"
    )
    assert "correlates with √diag EF at 0.93 and with √diag F at 0.41" in verdict.text
    assert "inherit the EF's errors" in verdict.text and "raise ε" in verdict.text
    assert verdict.numbers["within_60_degrees_share"] == 1 / 8
    assert verdict.numbers["follows"] == "ef"
    assert "docs/guide/acting.md#adam" in verdict.links
    good = by_topic(optimizer_run([0.95] * 10, [0.5] * 10, [0.9] * 10, name=None))["optimizer"]
    assert good.level == "good" and good.text.startswith("The optimizer's steps")
    assert "no change needed" in good.text
    # a K-FAC-style optimizer far from the natural gradient: that is a fault
    kfac = by_topic(optimizer_run([0.2] * 8, None, None, name="KFACOptimizer"))["optimizer"]
    assert kfac.level == "bad" and "what its curvature is built from" in kfac.text


def test_following_the_fisher_is_not_told_as_a_contradiction():
    """Issue 22, item 4: "follows the Fisher: its steps leave the natural gradient"."""
    run = optimizer_run([0.3] * 10, [0.80] * 10, [0.88] * 10, name="Adam")
    verdict = by_topic(run)["optimizer"]
    assert "the EF is not what turns its steps away" in verdict.text
    assert "couplings between parameters" in verdict.text
    assert "leave the natural gradient; check" not in verdict.text
    line = headline(run)
    assert line.level == "good" and "is not what shapes Adam's steps" in line.text


def test_no_update_keys_no_optimizer_verdict():
    assert "optimizer" not in by_topic(run_with([0.9] * 6))


def test_layer_table_reads_values_at_a_step():
    from fisher_monitor.report.render import layer_table

    run = run_with([0.5, 0.7], {"fc1": [0.2, 0.3]})
    rows = {row["layer"]: row for row in layer_table(run, 10)}
    assert rows["fc1"]["direction_cosine"] == 0.3 and rows["all"]["direction_cosine"] == 0.7


# ---------------------------------------------------------------- the headline


def test_headline_is_written_for_the_optimizer_the_user_runs():
    adam = optimizer_run([0.3] * 10, [0.93] * 10, [0.41] * 10, name="Adam", diag=[0.3] * 10)
    line = headline(adam)
    assert line.topic == "headline" and line.level == "mixed"
    assert line.sentence.startswith("For your Adam training: Adam's squared-gradient scaling")
    assert "not a fault" in line.text and "raise ε" in line.text
    assert line.links[0] == "docs/guide/acting.md#adam"
    close = optimizer_run([0.3] * 10, [0.93] * 10, [0.9] * 10, name="Adam", diag=[0.95] * 10)
    assert headline(close).level == "good" and "no change needed" in headline(close).text

    sgd = optimizer_run([0.3] * 10, None, None, name="SGD", preconditioner=False, grad=0.95)
    line = headline(sgd)
    assert line.level == "info" and "SGD keeps no squared-gradient statistics" in line.text
    assert line.links[0] == "docs/guide/acting.md#sgd"

    kfac = run_with([0.2] * 10, settings={"optimizer": "Shampoo"})
    line = headline(kfac)
    assert line.level == "bad" and line.links[0] == "docs/guide/acting.md#kfac"
    assert "labels sampled from the model" in line.text

    unknown = run_with([0.2] * 10, errors=[0.9] * 10)
    line = headline(unknown)
    assert line.level == "info" and "--use adam|sgd|kfac|laplace" in line.text


def test_headline_for_a_laplace_use_and_the_mse_noise():
    run = run_with(
        [0.9] * 10,
        ratios=[0.02] * 10,
        errors=[0.97] * 10,
        extra={"probe/loss": [0.01] * 10},
        settings={"optimizer": "Adam", "loss": "MSELoss(reduction='mean')"},
    )
    line = headline(run, use="laplace")
    assert line.level == "bad" and "build it on the Fisher (the GGN)" in line.text
    assert "docs/guide/acting.md#gaussian-noise" in line.links
    scale = by_topic(run)["scale"]
    assert "Gaussian noise of variance" in scale.text and "½" in scale.text
    assert "2 × 0.01 = 0.02" in scale.text  # the probe loss predicts the ratio
    assert "not that the data are badly scaled" in scale.text
    good = run_with([0.9] * 10, ratios=[1.0] * 10, errors=[0.05] * 10)
    assert headline(good, use="laplace").level == "good"
    with pytest.raises(ValueError, match=r"Invalid use: 'bayes'.*'laplace'"):
        headline(good, use="bayes")


def test_a_classifier_fitting_its_data_is_explained():
    run = run_with(
        [0.3] * 8,
        ratios=[0.01] * 8,
        errors=[0.99] * 8,
        settings={"loss": "CrossEntropyLoss(reduction='mean')"},
    )
    scale = by_topic(run)["scale"]
    assert scale.level == "bad" and "expected once it fits its training data" in scale.text


# ---------------------------------------------------------------- what was measured


def test_each_verdict_uses_what_was_measured_and_says_so():
    """Issue 20: a sketched block Fisher has no direction cosine; the diagonal's is used."""
    steps = list(range(0, 80, 10))
    scalars = {
        "block/trace_ratio/all": [(s, 0.9) for s in steps],
        "block/rel_error/all": [(s, 0.7) for s in steps],
        "diag/direction_cosine/all": [(s, 0.3) for s in steps],
        "diag/direction_cosine/fc": [(s, 0.2) for s in steps],
        "diag/trace_ratio/all": [(s, 0.9) for s in steps],
        "diag/rel_error/all": [(s, 0.6) for s in steps],
        "diag/kl/all": [(s, 3.0) for s in steps],
        "diag/update_nat_cosine/all": [(s, 0.2) for s in steps],
        "diag/update_grad_cosine/all": [(s, 0.3) for s in steps],
    }
    run = Run("sketched", Path("."), "fisher", scalars, settings={"optimizer": "Adam"})
    topics = by_topic(run)
    pre = topics["preconditioning"]
    assert pre.level == "bad" and pre.numbers["structure"] == "diag"
    assert "diag; block logged no direction cosine" in pre.text and "`fc`" in pre.text
    assert topics["matrix"].numbers["structure"] == "block"  # the block's own where it exists
    assert topics["optimizer"].numbers["structure"] == "diag"
    assert "diag; block logged no update nat cosine" in topics["optimizer"].text
    for only in ("diag", "kron"):  # runs of one structure
        single = {k.replace("block/", f"{only}/"): v for k, v in scalars.items()}
        single = {k.replace("diag/", f"{only}/"): v for k, v in single.items()}
        found = by_topic(Run(only, Path("."), "fisher", single, settings={"optimizer": "Adam"}))
        assert set(found) == {"preconditioning", "matrix", "scale", "trace", "optimizer"}
        assert all(v.numbers.get("structure", only) == only for v in found.values())


def test_a_topic_nothing_was_measured_for_says_so():
    steps = list(range(0, 60, 10))
    run = Run("x", Path("."), "fisher", {"block/trace_ratio/all": [(s, 1.0) for s in steps]})
    topics = by_topic(run)
    assert topics["preconditioning"].text.startswith("No verdict on EF preconditioning")
    assert topics["matrix"].numbers == {"not_measured": "rel_error"}
    assert "trace" not in topics  # the matrix verdict already says what is missing
    assert advice(run) == []  # not a matter of measuring more often


# ---------------------------------------------------------------- no contradictions

SCALES = {"match": 1.0, "near-low": 0.7, "near-high": 1.6, "low": 0.05, "high": 4.0}
MATRICES = {"close": 0.05, "rough": 0.3, "differ": 0.95}
DIRECTIONS = {"agree": [0.95] * 10, "mixed": [0.95] * 6 + [0.3] * 4, "disagree": [0.2] * 10}
USES = (None, "adam", "sgd", "kfac", "laplace")
LOSSES = ("CrossEntropyLoss(reduction='mean')", "MSELoss(reduction='mean')")


def synthetic(scale, matrix, direction, loss, count=10):
    ratio = SCALES[scale] if scale != "insufficient" else 1.0
    steps = list(range(0, 10 * count, 10)) if scale != "insufficient" else [0, 5, 10]
    take = len(steps)
    extra = {
        "diag/direction_cosine/all": DIRECTIONS[direction][:take],
        "block/update_nat_cosine/all": [0.3] * take,
        "block/update_grad_cosine/all": [0.4] * take,
        "optimizer/preconditioner_ef_cosine/all": [0.9] * take,
        "optimizer/preconditioner_fisher_cosine/all": [0.8] * take,
        "probe/loss": [0.02] * take,
    }
    return run_with(
        DIRECTIONS[direction][:take],
        ratios=[ratio] * take,
        errors=[MATRICES[matrix]] * take,
        steps=steps,
        extra=extra,
        settings={"loss": loss, "optimizer": "Adam", "preconditioner": True},
    )


def anchors() -> dict[str, set[str]]:
    """Per documentation page, its explicit anchors (``{ #name }``)."""
    return {
        str(page.relative_to(DOCS)): set(re.findall(r"\{ #([\w-]+) \}", page.read_text()))
        for page in DOCS.rglob("*.md")
    }


@pytest.mark.parametrize("use", USES)
def test_verdicts_never_contradict_each_other(use):
    """Every combination of scale, matrix (trace) and direction outcomes, per use."""
    pages = anchors()
    cases = itertools.product([*SCALES, "insufficient"], MATRICES, DIRECTIONS, LOSSES)
    for scale, matrix, direction, loss in cases:
        run = synthetic(scale, matrix, direction, loss)
        line, found = headline(run, use), verdicts(run, use)
        topics = {v.topic: v for v in found}
        case = (scale, matrix, direction, loss, use)
        for verdict in [line, *found]:
            assert verdict.level in LEVELS, case
            for link in verdict.links:  # every link leads to a section that exists
                page, anchor = link.removeprefix("docs/").split("#")
                assert anchor in pages[page], (case, link)
        if scale == "insufficient":
            assert all(v.level == "insufficient" for v in found), case
            continue
        # one reading of the numbers: the outcomes every verdict states are the same
        assert topics["trace"].numbers["scale_outcome"] == topics["scale"].numbers["outcome"]
        assert topics["trace"].numbers["matrix_outcome"] == topics["matrix"].numbers["outcome"]
        scale_level, trace = topics["scale"].level, topics["trace"]
        # "good" only where it is safe to rely on
        if scale_level == "good":
            assert scale == "match" and matrix != "differ", case
        if trace.level == "good":
            assert scale == "match" and matrix != "differ", case
        if topics["matrix"].level == "good":
            assert matrix == "close", case
        if topics["preconditioning"].level == "good":
            assert direction == "agree", case
        assert topics["optimizer"].level in ("info", "bad", "mixed"), case  # 0.3: never good
        # the pairs that contradicted each other before
        if "hides a mismatch" in trace.text:
            assert scale_level != "good" and "matches" in topics["scale"].text, case
        if "matches the Fisher's" in topics["scale"].text:
            assert "shows the mismatch" not in trace.text, case
            assert "understates the mismatch" not in trace.text, case
        if "safe" in topics["scale"].text:
            assert matrix != "differ", case
        # the headline agrees with the topic it is about
        if use == "kfac":
            assert line.level == topics["preconditioning"].level, case
        if use == "laplace":
            assert (line.level == "bad") == (
                topics["matrix"].level == "bad" or topics["scale"].level == "bad"
            ), case
            assert line.level != "good" or matrix == "close" and scale == "match", case
        if use in (None, "adam"):  # None: inferred from the optimizer, Adam
            assert line.links[0] == "docs/guide/acting.md#adam", case
            assert line.level != "good" or direction == "agree", case  # follows the EF here
        if use == "sgd":
            assert line.level == "info", case  # nothing to judge for training
        if matrix == "differ":
            assert "no change needed" not in topics["matrix"].text, case
