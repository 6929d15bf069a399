"""Issue 21, items 6 and 8: reports of many runs, and reports written atomically.

With more than ``MANY_RUNS`` runs a report lists every run in one table (most concerning
first), draws figures and gives details only for the runs that matter, and says so; the
timing goal (2000 small runs under 60 s and 1 GB) is checked by ``make bench``
(``report/2000runs``), not here. A full disk while writing leaves the previous report.
"""

from __future__ import annotations

import errno
import json
import os
from html.parser import HTMLParser

import numpy as np
import pytest

from fisher_monitor import keys
from fisher_monitor.report import render
from fisher_monitor.report.cli import main
from fisher_monitor.report.load import ReportError, load_runs
from fisher_monitor.report.selection import MANY_RUNS, select_runs
from synthetic import fisher_run

RUNS = MANY_RUNS + 4
STEPS = (0, 10, 20, 30, 40, 50)


def sweep(root, count=RUNS):
    """Runs ``lr_00`` … whose whole-network direction cosine is ``0.95 - 0.07 i``."""
    for index in range(count):
        cosine = 0.95 - 0.07 * index
        values = {keys.metric_key("block", "direction_cosine", keys.ALL): [cosine] * len(STEPS)}
        fisher_run(
            root / f"lr_{index:02d}", steps=STEPS, values=values, histograms=True, seed=index
        )
    return root


class Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.text, self.ids = [], []

    def handle_starttag(self, tag, attrs):
        self.ids += [value for name, value in attrs if name == "id"]

    def handle_data(self, data):
        self.text.append(data)


@pytest.mark.slow
def test_many_runs_get_a_table_and_figures_for_the_runs_that_matter(tmp_path, capsys):
    root = sweep(tmp_path / "sweep")
    out = tmp_path / "out"
    assert main(["report", str(root), "-o", str(out)]) == 0
    assert "judging 12 runs" in capsys.readouterr().err
    worst = [f"lr_{i:02d}" for i in range(RUNS - 1, RUNS - 1 - MANY_RUNS, -1)]
    # figures: per-run ones only for the MANY_RUNS most concerning runs
    assert len(list(out.glob("heatmap_*.png"))) == MANY_RUNS
    page = Text()
    page.feed((out / "report.html").read_text())
    text = "".join(page.text)
    assert "figure-heatmap_0" in page.ids and f"figure-heatmap_{MANY_RUNS}" not in page.ids
    assert f"This report covers {RUNS} runs" in text and "the 8 runs that matter most" in text
    for index in range(RUNS):  # every run in the table, the worst first
        assert f"sweep/lr_{index:02d}" in text
    assert text.index(f"sweep/{worst[0]}") < text.index("sweep/lr_00")
    markdown = (out / "report.md").read_text()
    assert f"This report covers {RUNS} runs" in markdown and "## Runs" in markdown
    sections = [
        line.replace("\\_", "_") for line in markdown.splitlines() if line.startswith("## sweep/")
    ]
    assert sorted(sections) == sorted(f"## sweep/{name}" for name in worst)
    document = json.loads((out / "summary.json").read_text())
    assert len(document["runs"]) == RUNS  # every run in full
    assert sorted(document["shown_in_full"]) == sorted(f"sweep/{name}" for name in worst)


def test_the_runs_that_matter_are_the_worst_first(tmp_path):
    runs = load_runs([sweep(tmp_path / "sweep")])
    selection = select_runs(runs)
    assert selection.capped and len(selection.shown) == MANY_RUNS
    medians = [float(row[2]) for row in selection.rows]
    assert medians == sorted(medians)  # lowest median direction cosine first
    assert [row[-1] for row in selection.rows] == ["yes"] * MANY_RUNS + [""] * (RUNS - MANY_RUNS)
    assert select_runs(runs[:MANY_RUNS]).note is None  # few runs: every run in full


def test_a_bad_verdict_comes_before_a_low_cosine_with_insufficient_evidence(tmp_path):
    fisher_run(
        tmp_path / "few",
        steps=(0, 10),
        values={keys.metric_key("block", "direction_cosine", keys.ALL): [0.0, 0.0]},
    )
    sweep(tmp_path, count=MANY_RUNS + 1)
    runs = load_runs([tmp_path])
    selection = select_runs(runs)
    levels = [row[selection.headings.index("preconditioning")] for row in selection.rows]
    assert levels.index("insufficient") > max(i for i, level in enumerate(levels) if level == "bad")


def test_the_title_counts_many_runs(tmp_path):
    runs = load_runs([sweep(tmp_path / "sweep", count=4)])
    assert render.default_title(runs) == "fisher-monitor report: 4 runs"
    assert (
        render.default_title(runs[:2]) == f"fisher-monitor report: {runs[0].name}, {runs[1].name}"
    )


@pytest.mark.parametrize("target", ["report.html", "report.md", "summary.json"])
def test_a_full_disk_while_writing_leaves_the_previous_report(tmp_path, monkeypatch, target):
    """Issue 21, item 8: the report was left truncated."""
    run = fisher_run(tmp_path / "run")
    out = tmp_path / "out"
    assert main(["report", str(run), "-o", str(out), "--quiet"]) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, handle, mode):
            self.stream = real_fdopen(handle, mode)
            self.target = target

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

        def write(self, data):
            self.stream.write(data[: len(data) // 2])  # half of it reached the disk
            raise OSError(errno.ENOSPC, "No space left on device")

    def fdopen(handle, mode="r", *args, **kwargs):
        name = os.readlink(f"/proc/self/fd/{handle}") if os.path.exists("/proc/self/fd") else ""
        if target in name:
            return Full(handle, mode)
        return real_fdopen(handle, mode, *args, **kwargs)

    monkeypatch.setattr("fisher_monitor.runinfo.os.fdopen", fdopen)
    with pytest.raises(ReportError, match="No space left on device"):
        render.write_report(load_runs([run]), out)
    after = {path.name: path.read_bytes() for path in out.iterdir()}
    assert after[target] == before[target]  # the previous file, whole
    assert not [name for name in after if name.endswith(".tmp")]


def test_report_files_have_the_usual_permissions(tmp_path):
    run = fisher_run(tmp_path / "run")
    out = tmp_path / "out"
    assert main(["report", str(run), "-o", str(out), "--quiet"]) == 0
    umask = os.umask(0)
    os.umask(umask)
    modes = {path.stat().st_mode & 0o777 for path in out.iterdir()}
    assert modes == {0o666 & ~umask}


def test_the_overview_shows_each_verdict_level(tmp_path):
    runs = load_runs([sweep(tmp_path / "sweep")])
    selection = select_runs(runs)
    assert selection.headings[:3] == ["run", "measurements", "median direction cosine"]
    assert selection.headings[-1] == "shown in full"
    for row in selection.rows:
        assert row[1] == "6 (steps 0–50)"
        assert set(row[3:-1]) <= {"bad", "mixed", "good", "insufficient", "–"}
    assert np.isfinite([float(row[2]) for row in selection.rows]).all()
