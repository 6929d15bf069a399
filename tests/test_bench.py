"""The benchmark harness (``make bench``) runs, records failures and limits, and judges targets.

Timings are not asserted: the machine running the tests is shared. What is checked is
that the harness keeps working as the engine changes: it runs a tiny case end to end,
records an error without stopping, stops repeating after its time limit, kills a runaway
case, measures memory with a method that sees a known allocation, and marks targets.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import run, timing, worker  # noqa: E402
from benchmarks.cases import TARGETS, Case, parse_case, select  # noqa: E402

FAST = worker.Options(limit=60.0, budget=0.0, repeats=1, warm_steps=2, measurements=1, every=3)


def test_quickest_run_writes_tables_and_raw_results(tmp_path, capsys):
    output = tmp_path / "bench.md"
    argv = ["--cases", "tiny/diag-mc", "--in-process", "--repeats", "1", "--budget", "0"]
    assert run.main([*argv, "--output", str(output)]) == 0
    text = output.read_text()
    assert "## Targets" in text and "| MLP, one-shot `measure()`, diag MC |" in text
    assert "## MLP 20-16-5, batch 8" in text
    row = next(line for line in text.splitlines() if line.startswith("| diag mc |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[2].endswith("×") and cells[6].endswith("×")  # measure() and Measurer ratios
    assert cells[8] == "8"  # the whole probe was measured
    (result,) = json.loads(output.with_suffix(".json").read_text())
    assert result["status"] == "ok" and result["measure"]["runs"] == 1
    assert result["measurement"]["backends"] == ["backpack"]
    assert "tiny/diag-mc" in capsys.readouterr().out


def test_a_failing_case_is_recorded_and_the_others_go_on():
    failing = Case("tiny/nonsense", "measure", "tiny", "nonsense")
    result = worker.run_case(failing.to_dict(), FAST)
    assert result["status"] == "failed" and result["error"] == "KeyError: 'nonsense'"
    fine = worker.run_case(parse_case("tiny/diag-exact").to_dict(), FAST)
    assert fine["status"] == "ok"
    lines = run.model_table("tiny", [fine, result])
    assert any("failed: KeyError: 'nonsense'" in line for line in lines)


def test_a_call_over_the_limit_ends_the_case_and_skips_the_prepared_call():
    options = worker.Options(limit=0.0, budget=60.0, repeats=5, warm_steps=2)
    result = worker.run_case(parse_case("tiny/diag-exact").to_dict(), options)
    assert result["status"] == "ok"
    assert result["measure"]["runs"] == 1 and "> 0 s" in result["measure"]["stopped"]
    assert result["measurer"]["runs"] == 0
    assert result["measurer"]["stopped"].startswith("skipped")


PEAK_SCRIPT = """
import json, torch
from benchmarks import timing
probe = timing.PeakMemory(torch.device("cpu"))
found = {"available": probe.available}
if probe.available:
    probe.start()
    block = torch.ones(64 * 2**20 // 8, dtype=torch.float64)  # 64 MiB, touched
    del block
    found["extra"] = probe.extra_megabytes()
    probe.start()
    found["after_reset"] = probe.extra_megabytes()
print(json.dumps(found))
"""


def test_peak_memory_sees_a_known_allocation():
    """In a fresh process, as the harness measures every case (a long-lived process may
    serve the block from pages it already holds, which raise no high-water mark)."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT], cwd=ROOT, capture_output=True, text=True, check=True
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    if not found["available"]:
        pytest.skip("no resettable resident-set high-water mark on this system")
    assert 60 <= found["extra"] < 200
    assert found["after_reset"] < 60  # the peak was reset, not carried over


def test_samples_take_the_median_of_per_call_ratios():
    samples = timing.Samples()
    for seconds, step in ((1.0, 1.0), (2.0, 1.0), (3.0, 2.0)):
        samples.add(seconds, step)
    summary = samples.summary()
    assert summary["ratio"] == 1.5  # ratios 1, 2, 1.5
    assert summary["ms"] == 2000.0 and summary["step_ms"] == 1000.0


def _result(name, ratio=None, **measurement):
    kind = "callback" if name.endswith("/callback") else "measure"
    return {
        "name": name,
        "status": "ok",
        kind: {"ratio": ratio},
        "measurement": {"subsampled": False, "worst_relative_se": None, **measurement},
    }


def test_targets_are_judged_on_every_condition():
    c1000 = next(t for t in TARGETS if t.case == "mlp-c1000/default")
    assert run.check(c1000, _result(c1000.case, 20.0))[1] is True  # exact values
    assert run.check(c1000, _result(c1000.case, 31.0))[1] is False
    subsampled = _result(c1000.case, 20.0, subsampled=True, probe_batch_size=16)
    text, met = run.check(c1000, subsampled)
    assert met is False and "sub-sampled" in text
    noisy = _result(c1000.case, 20.0, worst_relative_se=0.08, worst_se_key="block/kl_se/all")
    text, met = run.check(c1000, noisy)
    assert met is False and "8.0%" in text
    failed = {"name": c1000.case, "status": "failed", "error": "MemoryError: too big"}
    assert run.check(c1000, failed) == ("failed: MemoryError: too big", False)
    assert run.check(c1000, None) == ("not run", None)
    report = next(t for t in TARGETS if t.case.startswith("report/"))
    slow = {"name": report.case, "status": "ok", "report": {"seconds": 61.0, "peak_mb": 500.0}}
    assert run.check(report, slow)[1] is False


def test_case_selection():
    names = [case.name for case in select("mlp")]
    assert "mlp/default" in names and "mlp/callback" in names and "mlp/backpack-kfac" in names
    assert all(name.startswith("mlp/") for name in names)
    assert [c.name for c in select("*/default")][:2] == ["mlp/default", "mlp-fitted/default"]
    assert [c.name for c in select("tiny/kron-mc,report/20x500")] == [
        "tiny/kron-mc",
        "report/20x500",
    ]
    assert "mlp/callback" in [c.name for c in select(None, quick=True)]
    assert [c.name for c in select("report/*")][:2] == ["report/50x2000", "report/2000runs"]
    assert select("report/300runs")[0].what == "300runs"
    with pytest.raises(ValueError, match="Invalid report case: 'report/many'"):
        select("report/many")
    with pytest.raises(ValueError, match="Invalid case 'mlp/diag-kron'"):
        select("mlp/diag-kron")
    with pytest.raises(ValueError, match="No case matches 'resnet50/\\*'"):
        select("resnet50/*")


@pytest.mark.slow
def test_subprocess_case_and_hard_timeout(tmp_path):
    result = run.run_in_process(parse_case("tiny/diag-mc"), FAST, 120.0, tmp_path)
    assert result["status"] == "ok" and result["measure"]["runs"] == 1
    assert result["measure_peak_mb"] is not None
    killed = run.run_in_process(parse_case("tiny/default"), FAST, 0.5, tmp_path)
    assert killed["status"] == "timed out" and killed["error"].startswith("killed after 0 s")


@pytest.mark.slow
def test_callback_case_times_measurements_in_lightning_steps():
    options = worker.Options(budget=0.0, measurements=2, every=3, warm_steps=2)
    result = worker.run_case(parse_case("tiny/callback").to_dict(), options)
    assert result["status"] == "ok", result.get("traceback")
    callback = result["callback"]
    assert callback["runs"] == 2 and callback["steps"] == 9 and callback["step_ms"] > 0
    assert result["measurement"]["probe_batch_size"] == 8


def test_describe_reads_probe_size_notes_and_standard_errors():
    from types import SimpleNamespace

    bn = "BatchNorm in train mode measured in eval mode (running statistics)"
    measurement = SimpleNamespace(
        scalars={
            "probe/batch_size": 16.0,
            "block/kl/all": 2.0,
            "block/kl_se/all": 0.1,
            "block/trace_ratio@0.1/fc": 4.0,
            "block/trace_ratio_se@0.1/fc": 0.4,
            "diag/kl/all": 1.0,
        },
        notes=[
            f"bn1: {bn}",
            f"layer1.bn2: {bn}",
            "probe sub-sampled from 128 to 16 samples to fit the memory budget",
        ],
        coverage=[
            {"layer": "fc", "backend": "functorch", "measured": True},
            {"layer": "scale", "backend": None, "measured": False},
        ],
    )
    info = worker.describe(measurement, batch_size=128)
    assert info["probe_batch_size"] == 16 and info["subsampled"] is True
    assert info["backends"] == ["functorch"] and info["unmeasured_layers"] == ["scale"]
    assert info["estimates"] == 2
    assert info["worst_relative_se"] == pytest.approx(0.1)
    assert info["worst_se_key"] == "block/trace_ratio_se@0.1/fc"
    assert info["notes"] == [
        f"2 layers (bn1, …): {bn}",
        "probe sub-sampled from 128 to 16 samples to fit the memory budget",
    ]


def test_a_call_killed_at_the_hard_limit_shows_a_lower_bound():
    killed = {
        "name": "mlp-c1000/default",
        "kind": "measure",
        "model": "mlp-c1000",
        "what": "default",
        "status": "timed out",
        "error": "killed after 120 s, 100 s into measure() call 1",
        "lower_bound": {"kind": "measure", "ratio": 95.2, "seconds": 100.0},
    }
    target = next(t for t in TARGETS if t.case == "mlp-c1000/default")
    assert run.check(target, killed) == ("> 95× (killed 100 s into the call)", False)
    row = next(line for line in run.model_table("mlp-c1000", [killed]) if "default" in line)
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1:5] == ["> 100,000", "> 95×", "≤ 30×", "✗"]
    assert "timed out: killed after 120 s, 100 s into measure() call 1" in cells[-1]


def test_step_costs_count_only_steps_where_the_monitor_measured():
    import itertools

    periods = [10.0, 3.0, 1.0, 8.0, 2.0, 1.0, 1.0, 1.0, 1.0]  # steps 0, 3, 6 scheduled
    starts = [0.0, *itertools.accumulate(periods)]
    costs = worker.step_costs(starts, measured=[0, 3], every=3, wanted=2)  # step 6 failed
    assert costs["step_ms"] == 1000.0  # warm steps 2, 5, 8
    assert costs["runs"] == 1 and costs["ratio"] == 8.0  # step 3: 8 + 2 − 2 warm steps
    assert costs["first_ms"] == 11000.0  # step 0: 10 + 3 − 2
    assert costs["stopped"] == "1 of 2 measurements"
    assert worker.step_costs(starts, measured=[], every=3, wanted=2)["runs"] == 0
