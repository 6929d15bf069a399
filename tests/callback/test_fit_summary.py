"""What the monitor tells the user: the line at the start of fitting and the end-of-fit table."""

from __future__ import annotations

import re
import shlex
from types import SimpleNamespace

import pytest
from pytorch_lightning.loggers import TensorBoardLogger

from fisher_monitor import FisherMonitor
from fisher_monitor.callback import monitor as monitor_module
from fisher_monitor.callback import summary as summary_module
from fisher_monitor.callback.history import History
from fisher_monitor.callback.summary import FitSummary, start_line
from fisher_monitor.shell import script
from lightning_helpers import fit


@pytest.fixture
def said(monkeypatch) -> list[str]:
    """What the monitor logs through Lightning's rank-zero logging."""
    lines: list[str] = []
    monkeypatch.setattr(monitor_module, "rank_zero_info", lines.append)
    monkeypatch.setattr(summary_module, "rank_zero_info", lines.append)
    return lines


def test_start_line_and_end_table_of_a_fit(tmp_path, said):
    logger = TensorBoardLogger(tmp_path)
    monitor = FisherMonitor(every_n_steps=2, structures=("diag", "block"), probe_size=8)
    fit(monitor, steps=5, logger=logger)
    start, found, table = said
    assert start == (
        "FisherMonitor: comparing F and EF (diag + block; exact Fisher, 0.001 relative damping) "
        "of TinyClassifier, 2 layers with the loss training_step computes (found at the first "
        "measured step), backend auto, on the training batch (at most 8 samples), schedule "
        "every(2, offset=0); logged under '~fisher/'."
    )
    assert found == (
        "FisherMonitor: loss found in training_step at step 0: F.cross_entropy(…) on output, "
        "targets batch[1]; the probe calls TinyClassifier(batch[0]); measured as "
        "Categorical(reduction='mean', ignore_index=-100)."
    )
    lines = table.splitlines()
    assert lines[0] == "FisherMonitor summary"
    rows = {line[2:30].strip(): line[30:].strip() for line in lines[1:]}
    assert rows["measurements"] == "3 at steps 0, 2, 4"
    share = re.fullmatch(
        r"(\d+\.\d)% \((\d+\.\d\d) s of (\d+\.\d\d) s\)", rows["monitor's share of the fit"]
    )
    assert share and float(share[2]) < float(share[3])
    assert rows["last measurement (step 4)"].startswith("block, whole network: direction_cosine ")
    assert "update_nat_cosine" in rows["SGD's step (last)"]
    assert rows["verdict: preconditioning"].startswith("Insufficient evidence")
    assert rows["what to do"].startswith("To judge")
    assert rows["TensorBoard run"] == logger.log_dir
    # runnable as printed: the fisher-monitor next to this Python, by its full path
    assert rows["report"] == shlex.join(
        [*script("fisher-monitor", "fisher_monitor"), "report", logger.log_dir]
    )
    assert lines[1].startswith("  bottom line")  # the headline comes first
    assert rows["bottom line"].startswith("For your SGD training: SGD keeps no squared-gradient")
    assert "docs/guide/acting.md#sgd" in rows["bottom line"]
    assert rows["terms"].startswith("docs/glossary.md")


def test_no_measurement_at_all_still_summarises(said):
    fit(FisherMonitor(every_n_steps=100), steps=2)
    assert "FisherMonitor summary\n  bottom line" in said[-1]
    assert re.search(r"measurements\s+1 at steps 0", said[-1])  # step 0 only
    assert "fisher-monitor report reads TensorBoard, CSVLogger and MLflow logs" in said[-1]


def history(steps, cosine=0.3) -> History:
    record = History("block", "")
    for step in steps:
        record.add(
            step,
            {
                "block/direction_cosine/all": cosine,
                "block/direction_cosine/fc": cosine,
                "block/rel_error/all": 0.8,
                "block/trace_ratio/all": 1.1,
                "block/kl/all": 2.0,
                "diag/kl/all": 5.0,  # not the primary structure: not kept
                "probe/loss": 1.0,
            },
        )
    return record


def test_fit_summary_rows_and_the_run_file_block():
    verdicts = [
        SimpleNamespace(
            topic="preconditioning", level="bad", text="The EF step disagreed. Use the Fisher."
        ),
        SimpleNamespace(topic="scale", level="good", text="The scale agrees. Nothing to do."),
    ]
    result = FitSummary(
        history=history(range(0, 100, 10)),
        monitor_seconds=1.0,
        fit_seconds=20.0,
        prefix="fisher",
        notes=["probe sub-sampled from 128 to 64 samples to fit the memory budget"],
        optimizer="AdamW",
        verdicts=verdicts,
    )
    rows = dict(result.rows())
    assert rows["measurements"] == "10 at steps 0, 10, 20, 30, 40, …, 80, 90"
    assert rows["monitor's share of the fit"] == "5.0% (1.00 s of 20.00 s)"
    assert rows["last measurement (step 90)"] == (
        "block, whole network: direction_cosine 0.3, rel_error 0.8, trace_ratio 1.1, kl 2"
    )
    assert rows["verdict: preconditioning"] == "The EF step disagreed."
    assert rows["what to do"] == "Use the Fisher."
    assert rows["note"].startswith("probe sub-sampled")
    block = result.as_dict()
    assert block["measurements"] == 10 and block["steps"][-1] == 90
    assert block["overhead"] == pytest.approx(0.05)
    assert block["verdicts"] == [v.text for v in verdicts]
    # every structure's whole-network values are kept, for verdicts of what was measured
    assert result.history.records[0][1]["diag/kl/all"] == 5.0


def test_verdicts_come_from_the_report_package():
    found = history(range(0, 60, 10), cosine=0.2).verdicts("fisher", None)
    preconditioning = next(v for v in found if v.topic == "preconditioning")
    assert preconditioning.level == "bad"  # 6 measurements, all below 0.5
    assert history([]).verdicts("fisher", None) == []


def test_rich_table_on_a_terminal(monkeypatch, capsys):
    result = FitSummary(history=history([0, 5]), monitor_seconds=0.5, fit_seconds=10.0, prefix="p")
    monkeypatch.setattr(summary_module.sys.stdout, "isatty", lambda: True)
    summary_module.show(result)
    printed = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    assert "FisherMonitor summary" in printed and "2 at steps 0, 5" in printed
    assert "│" in printed or "┃" in printed or "─" in printed  # drawn as a table


def test_start_line_options():
    settings = {
        "structures": ["diag"],
        "fisher": "mc",
        "mc_samples": 2,
        "damping": [1e-4, 1e-2],
        "damping_mode": "absolute",
        "backend": "functorch",
        "schedule": "budget(fraction=0.05, per_decade=10)",
        "fixed_probe": True,
        "probe_size": None,
        "network": "Model.encoder (Sequential)",
        "loss": "MSELoss(reduction='sum')",
    }
    line = start_line(settings, None, "fm")
    assert "Monte-Carlo Fisher (2 label(s) per input), 0.0001, 0.01 absolute damping" in line
    assert "of Model.encoder (Sequential) with MSELoss(reduction='sum'), backend functorch" in line
    assert "on a fixed probe set, schedule budget(fraction=0.05, per_decade=10)" in line
    assert line.endswith("logged under 'fm/'.")
    not_ready = start_line({**settings, "network": None}, None, "fm")
    assert not_ready.startswith("FisherMonitor: not measuring yet (see the warning above)")


def test_a_sketched_block_keeps_every_verdict_in_the_summary():
    """Issue 20: with a sketched block Fisher (no direction cosine, no update cosines of
    block) the preconditioning and optimizer verdicts come from the diagonal, and say so."""
    record = History("block", "")
    for step in range(0, 80, 10):
        record.add(
            step,
            {
                "block/trace_ratio/all": 0.9,
                "block/rel_error/all": 0.7,
                "block/matrix_cosine/all": 0.8,
                "diag/direction_cosine/all": 0.3,
                "diag/direction_cosine/fc": 0.25,
                "diag/trace_ratio/all": 0.9,
                "diag/rel_error/all": 0.6,
                "diag/kl/all": 4.0,
                "probe/loss": 1.0,
            },
        )
        record.extend(step, {"diag/update_nat_cosine/all": 0.2, "diag/update_grad_cosine/all": 0.4})
    settings = {"optimizer": "Adam", "preconditioner": True}
    found = record.verdicts("fisher", None, settings)
    topics = {v.topic: v for v in found}
    assert set(topics) == {"headline", "preconditioning", "matrix", "scale", "trace", "optimizer"}
    assert "diag; block logged no direction cosine" in topics["preconditioning"].text
    assert topics["optimizer"].numbers["structure"] == "diag"
    result = FitSummary(
        history=record, monitor_seconds=1.0, fit_seconds=9.0, prefix="f", verdicts=found
    )
    rows = dict(result.rows())
    assert rows["verdict: preconditioning"].startswith("The EF-preconditioned step pointed away")
    assert rows["verdict: optimizer"].startswith("Adam's steps pointed within 60°")
    assert rows["bottom line"].startswith("For your Adam training")
    # the last measurement's numbers from the structure that has each
    assert rows["last measurement (step 70)"] == (
        "diag, whole network: direction_cosine 0.3, kl 4; block, whole network: rel_error 0.7, "
        "trace_ratio 0.9"
    )
    _, _, grid, title = record.heatmap()  # the heat map falls back to the diagonal's rows
    assert title.startswith("diag: ") and grid[0, 0] == 0.25
