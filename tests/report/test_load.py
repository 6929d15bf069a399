"""Loading runs: run-information file, dimensions, prefixes, names, unreadable runs, no torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fisher_monitor import keys
from fisher_monitor.report.load import ReportError, Run, load_runs
from fisher_monitor.report.progress import Progress
from synthetic import fisher_run, layer_entries, scalar_event, write_events

ROOT = Path(__file__).resolve().parents[2]


class Recorder(Progress):
    def __init__(self):
        self.stages, self.warnings, self.advanced = [], [], 0

    def stage(self, description, total=None, unit=""):
        self.stages.append((description, total, unit))

    def advance(self, amount=1):
        self.advanced += amount

    def warn(self, message):
        self.warnings.append(message)


def test_settings_layers_notes_and_fit_come_from_the_run_information_file(tmp_path):
    layers = ("encoder.fc2", "encoder.fc1")  # network order, not alphabetical
    info = {
        "settings": {"structures": ["block"], "fisher": "mc", "optimizer": "AdamW"},
        "layers": layer_entries(layers, dimension=1234),
        "notes": ["autocast was on"],
        "fit": {"measurements": 6, "overhead": 0.04},
    }
    (run,) = load_runs([fisher_run(tmp_path / "run", layers=layers, info=info)])
    assert run.settings == info["settings"] and run.optimizer_name == "AdamW"
    assert run.layers == list(layers)
    assert run.notes == ["autocast was on"] and run.fit["overhead"] == 0.04
    assert run.dimensions == {"encoder.fc2": 1234.0, "encoder.fc1": 1234.0, "all": 2468.0}
    assert run.steps == [0, 10, 20, 30, 40, 50] and run.primary_structure == "block"


def test_a_run_without_the_file_is_reported_from_its_scalars(tmp_path):
    steps = [0, 10]
    values = {
        "block/dimension/fc1": [7, 7],
        "block/dimension/fc2": [5, 5],
        "block/dimension/all": [12, 12],
    }
    (run,) = load_runs([fisher_run(tmp_path / "run", steps=steps, values=values)])
    assert run.settings == {} and run.notes == []
    assert run.dimensions == {"fc1": 7.0, "fc2": 5.0, "all": 12.0}


def test_two_prefixes_in_one_directory_are_two_runs(tmp_path):
    directory = tmp_path / "run"
    fisher_run(directory, prefix="fisher", info={"settings": {"fisher": "exact"}})
    fisher_run(
        directory, prefix="cheap/diag", structure="diag", info={"settings": {"fisher": "mc"}}
    )
    runs = {run.prefix: run for run in load_runs([directory])}
    assert set(runs) == {"fisher", "cheap/diag"}
    assert runs["fisher"].name == "run [fisher]" and runs["cheap/diag"].structures == ["diag"]
    assert runs["cheap/diag"].settings == {"fisher": "mc"}
    assert not any(key.startswith("diag/") for key in runs["fisher"].scalars)


def test_runs_with_the_same_last_directory_get_their_distinct_path_parts(tmp_path):
    """Issue 10, item 7: figures and tables name runs by what tells them apart."""
    first = fisher_run(tmp_path / "sgd" / "logs" / "version_0")
    second = fisher_run(tmp_path / "adam" / "logs" / "version_0")
    runs = load_runs([first, second])
    assert [run.name for run in runs] == ["sgd/logs/version_0", "adam/logs/version_0"]


def test_parent_directory_skips_an_unreadable_run_and_reports_the_others(tmp_path):
    """Issue 12, item 5: one unreadable run does not sink the others."""
    fisher_run(tmp_path / "good")
    fisher_run(tmp_path / "also_good")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "events.out.tfevents.1.host.1.0").write_bytes(b"\x00garbage\xff" * 40)
    progress = Recorder()
    runs = load_runs([tmp_path], progress=progress)
    assert sorted(run.name for run in runs) == [
        f"{tmp_path.name}/also_good",
        f"{tmp_path.name}/good",
    ]
    (warning,) = progress.warnings
    assert warning.startswith(f"skipped run {tmp_path.name}/broken:") and "\n" not in warning
    with pytest.raises(ReportError, match="no readable event record"):
        load_runs([broken])  # named by itself, it must load
    with pytest.raises(ReportError, match="corrupt or truncated event file"):
        load_runs([tmp_path], strict=True)


def test_a_truncated_run_is_loaded_with_a_note(tmp_path):
    directory = fisher_run(tmp_path / "run")
    (path,) = directory.glob("events.out.tfevents.*")
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    progress = Recorder()
    (run,) = load_runs([directory], progress=progress)
    (note,) = run.read_notes
    assert "skipped the last" in note and progress.warnings == [note]
    assert run.steps == [0, 10, 20, 30, 40, 50]  # the lost record was the last step's last key


def test_other_tensorboard_runs_in_a_parent_are_skipped_quietly(tmp_path):
    fisher_run(tmp_path / "ours")
    write_events(tmp_path / "theirs", [scalar_event("train/loss", 0, 1.0)])
    progress = Recorder()
    (run,) = load_runs([tmp_path], progress=progress)
    assert run.name.endswith("ours") and progress.warnings == []
    with pytest.raises(ReportError, match="no fisher-monitor data"):
        load_runs([tmp_path / "theirs"])


def test_progress_stages_and_bytes(tmp_path):
    directory = fisher_run(tmp_path / "run")
    progress = Recorder()
    load_runs([directory], progress=progress)
    size = sum(f.stat().st_size for f in directory.glob("events.out.tfevents.*"))
    assert progress.stages == [
        ("finding runs", None, ""),
        ("reading events of 1 run", size, "bytes"),
    ]
    assert progress.advanced == size


def test_run_accepts_pairs_and_reads_values_at_steps():
    run = Run("r", Path("."), "fisher", {"block/kl/all": [(10, 2.0), (0, 1.0)][::-1]})
    assert run.value("block/kl/all", 10) == 2.0 and np.isnan(run.value("block/kl/all", 5))
    assert run.key("kl") == "block/kl/all" and run.stderr_key("block/kl/all") == "block/kl_se/all"
    assert run.key("preconditioner_ef_cosine", structure=keys.OPTIMIZER) == (
        "optimizer/preconditioner_ef_cosine/all"
    )


FORBIDDEN = ("torch", "lightning", "pytorch_lightning", "backpack")


def test_the_report_imports_no_training_stack():
    """Issue 14, item 4: the report, the command line and the shared drawing are torch-free."""
    code = textwrap.dedent(
        f"""
        import sys
        import fisher_monitor.report
        from fisher_monitor.report import cli, events, figures, load, render, verdict
        import fisher_monitor.report.plotting, fisher_monitor.tables
        loaded = [m for m in {FORBIDDEN!r} if m in sys.modules]
        print(loaded)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
