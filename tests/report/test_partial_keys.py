"""Issue 20 (loading): runs whose measurements hold any subset of the keys load and report.

Loading keyed the steps on ``block/direction_cosine/all`` only, so ``fisher-monitor
summary``/``report`` exited 2 ("without any complete measurement") on runs with a sketched
Fisher side (no block direction cosine), diagonal-only or Kronecker-only runs.
"""

from __future__ import annotations

import json
import math

import pytest

from fisher_monitor import keys
from fisher_monitor.report.cli import main
from fisher_monitor.report.load import load_runs
from synthetic import fisher_run

STEPS = (0, 10, 20, 30, 40, 50)
LAYERS = ("fc1", "fc2")
#: What a sketched Fisher side leaves out of the block structure.
SKETCH_MISSING = ("direction_cosine", "nat_grad_cosine", "kl", "nat_projection")


def missing(structure: str, metrics, layers=(*LAYERS, keys.ALL), steps=STEPS) -> dict:
    """Values that leave ``metrics`` out (NaN is not logged)."""
    return {
        keys.metric_key(structure, metric, layer): [math.nan] * len(steps)
        for metric in metrics
        for layer in layers
    }


CASES = {
    "diag only": dict(structure="diag"),
    "kron only": dict(structure="kron"),
    "block, sketched": dict(structure="block", values=missing("block", SKETCH_MISSING)),
    "block, only the trace ratio": dict(
        structure="block",
        values=missing("block", [m for m in keys.METRICS if m != "trace_ratio"]),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_summary_and_report_work_on_any_subset_of_keys(tmp_path, capsys, case):
    run = fisher_run(tmp_path / "run", layers=LAYERS, steps=STEPS, **CASES[case])
    (loaded,) = load_runs([run])
    assert loaded.steps == list(STEPS)
    assert main(["summary", str(run), "--quiet"]) == 0
    out = tmp_path / "out"
    assert main(["report", str(run), "-o", str(out), "--quiet"]) == 0
    document = json.loads((out / "summary.json").read_text())
    assert document["runs"][0]["measurements"] == len(STEPS)
    assert "fisher-monitor: error" not in capsys.readouterr().err


def test_steps_count_every_measurement_of_the_primary_structure(tmp_path):
    """A step where only some metrics were logged is still a measurement."""
    values = missing("block", ["direction_cosine"], steps=STEPS)
    values[keys.metric_key("block", "direction_cosine", keys.ALL)] = [0.5, 0.6] + [math.nan] * 4
    run = fisher_run(tmp_path / "run", steps=STEPS, values=values)
    (loaded,) = load_runs([run])
    assert loaded.steps == list(STEPS)


def test_several_dampings_are_found_without_a_direction_cosine(tmp_path):
    steps = (0, 10)
    values = missing("block", keys.DAMPED_METRICS, steps=steps)  # only the suffixed ones
    for damping in ("@0.001", "@0.1"):
        for metric in ("kl", "nat_projection"):
            values[keys.metric_key("block", metric, keys.ALL, damping)] = [1.0, 2.0]
        values[keys.metric_key("block", "direction_cosine", keys.ALL, damping)] = [math.nan] * 2
    run = fisher_run(tmp_path / "run", steps=steps, values=values)
    (loaded,) = load_runs([run])
    assert loaded.dampings == ["@0.001", "@0.1"]
    assert loaded.value(loaded.key("kl"), 10) == 2.0
