"""`fisher-monitor report` and `summary`: real runs (files, contents, numbers) and synthetic
ones (bad input, damaged logs, output directories, progress, terminal safety, start-up time).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fisher_monitor import runinfo
from fisher_monitor.report.cli import main
from fisher_monitor.report.progress import LineProgress, RichProgress, for_console
from synthetic import HOSTILE_LAYER, fisher_run, layer_entries, scalar_event, write_events

ROOT = Path(__file__).resolve().parents[2]


class Collector(HTMLParser):
    """Collects section ids, images, table cells and script tags of an HTML page."""

    def __init__(self):
        super().__init__()
        self.ids, self.images, self.cells, self.scripts = [], [], [], 0
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "script":
            self.scripts += 1
        self._in_cell = tag == "td"

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells.append(data)


def scalars(run: Path) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_report_writes_html_markdown_and_json(plain_run, tmp_path, capsys):
    assert main(["report", str(plain_run), "-o", str(tmp_path), "--title", "Tiny run"]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "report.html") in printed
    html = (tmp_path / "report.html").read_text()
    page = Collector()
    page.feed(html)
    assert {"verdict", "settings", "figures", "layers", "reading"} <= set(page.ids)
    assert {
        "figure-direction_cosine",
        "figure-trace_ratio_kl",
        "figure-relative_error",
        "figure-projections",
        "figure-heatmap",
        "figure-log_ratio",
    } <= set(page.ids)
    figure_ids = [i for i in page.ids if i.startswith("figure-")]
    assert len(page.images) == len(figure_ids) >= 6 and all(
        src.startswith("data:image/png;base64,") for src in page.images
    )
    assert page.scripts == 0  # self-contained and static: nothing to fetch, nothing to run
    for layer in ("net.0", "net.3", "all"):
        assert layer in page.cells
    assert "<title>Tiny run</title>" in html
    assert "http://" not in html and "https://" not in html  # opens offline
    markdown = (tmp_path / "report.md").read_text()
    assert "| net.0 |" in markdown and "![" in markdown
    for png in (
        "direction_cosine",
        "trace_ratio_kl",
        "relative_error",
        "projections",
        "heatmap",
        "log_ratio",
    ):
        assert (tmp_path / f"{png}.png").stat().st_size > 1000


def test_json_numbers_equal_the_logged_values(plain_run, tmp_path):
    assert main(["report", str(plain_run), "-o", str(tmp_path), "--format", "json"]) == 0
    assert not (tmp_path / "report.html").exists()
    document = json.loads((tmp_path / "summary.json").read_text())
    (run,) = document["runs"]
    logged = scalars(plain_run)
    assert run["structure"] == "block" and run["steps"] == [0, 2, 4, 6, 8, 10]
    last, worst = run["last_step"], run["worst_step"]
    assert worst in run["steps"]
    assert logged["~fisher/block/direction_cosine/all"][worst] == min(
        logged["~fisher/block/direction_cosine/all"].values()
    )
    # dimensions are settings, read from the run-information file, not time series
    (info,) = runinfo.read(plain_run).values()
    dimensions = {entry["layer"]: entry["dimension"] for entry in info["layers"]}
    for layer in ("net.0", "net.3"):
        for when in ("last", "worst"):
            assert run["layers"][layer][when]["dimension"] == dimensions[layer]
    assert run["layers"]["all"]["last"]["dimension"] == dimensions["net.0"] + dimensions["net.3"]
    for layer in ("net.0", "net.3", "all"):
        for metric in (
            "direction_cosine",
            "trace_ratio",
            "rel_error",
            "kl",
            "nat_projection",
            "ef_projection",
        ):
            for when, step in (("last", last), ("worst", worst)):
                expected = logged[f"~fisher/block/{metric}/{layer}"][step]
                assert run["layers"][layer][when][metric] == pytest.approx(expected, rel=1e-6), (
                    layer,
                    metric,
                    when,
                )
    for key, value in run["final"].items():
        assert value == pytest.approx(logged[f"~fisher/{key}"][last], rel=1e-6)
    headline = run["verdicts"][0]
    assert headline["topic"] == "preconditioning"
    cosines = list(logged["~fisher/block/direction_cosine/all"].values())
    assert headline["numbers"]["measurements"] == len(cosines)
    assert headline["numbers"]["disagree_share"] == pytest.approx(
        sum(c < 0.5 for c in cosines) / len(cosines)
    )
    assert document["thresholds"]["disagree_cosine"] == 0.5


def test_several_runs_side_by_side(runs_root, tmp_path):
    assert (
        main(["report", str(runs_root / "plain"), str(runs_root / "mc"), "-o", str(tmp_path)]) == 0
    )
    document = json.loads((tmp_path / "summary.json").read_text())
    assert [r["name"] for r in document["runs"]] == ["plain/version_0", "mc/version_0"]
    mc = document["runs"][1]
    assert mc["settings"]["fisher"] == "mc"
    # several dampings: verdicts use the first one, every suffixed key is kept
    assert "block/direction_cosine@0.1/all" in mc["final"]
    html = (tmp_path / "report.html").read_text()
    assert "plain/version_0" in html and "mc/version_0" in html


def test_parent_directory_finds_every_run(runs_root, tmp_path):
    assert main(["report", str(runs_root), "-o", str(tmp_path), "--format", "json"]) == 0
    names = [r["name"] for r in json.loads((tmp_path / "summary.json").read_text())["runs"]]
    assert sorted(names) == sorted(
        [f"{runs_root.name}/{n}/version_0" for n in ("plain", "mc", "hostile")]
    )


def test_layer_names_are_shown_as_text(hostile_run, tmp_path):
    assert main(["report", str(hostile_run), "-o", str(tmp_path)]) == 0
    html = (tmp_path / "report.html").read_text()
    assert HOSTILE_LAYER not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    page = Collector()
    page.feed(html)
    assert page.scripts == 0 and f"net.{HOSTILE_LAYER}" in page.cells
    assert HOSTILE_LAYER not in (tmp_path / "report.md").read_text()


def test_summary_prints_layers_and_the_headline(plain_run, capsys):
    assert main(["summary", str(plain_run)]) == 0
    out = capsys.readouterr().out
    assert "net.0" in out and "net.3" in out and "the worst step of the whole network" in out
    assert "measurements" in out and "EF-preconditioned step" in out


def test_python_dash_m_and_help():
    result = subprocess.run(
        [sys.executable, "-m", "fisher_monitor", "report", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for option in ("RUN", "--out-dir", "--format", "--title"):
        assert option in result.stdout


def write_plain_tensorboard_run(directory: Path) -> None:
    write_events(directory, [scalar_event("train/loss", 0, 1.0)])


def last_error(err: str) -> list[str]:
    return [line for line in err.strip().splitlines() if line.startswith("fisher-monitor: error:")]


@pytest.mark.parametrize(
    "case", ["missing", "empty_dir", "no_fisher_data", "truncated", "garbage", "bad_format"]
)
def test_bad_input_exits_2_with_one_line(case, tmp_path, capsys):
    target = tmp_path / "input"
    args = None
    if case == "missing":
        args = ["report", str(tmp_path / "nope")]
        expected = "no such directory"
    elif case == "empty_dir":
        target.mkdir()
        expected = "no TensorBoard event files"
    elif case == "no_fisher_data":
        write_plain_tensorboard_run(target)
        expected = "no fisher-monitor data"
    elif case in ("truncated", "garbage"):
        (source,) = fisher_run(tmp_path / "source").glob("events.out.tfevents.*")
        data = source.read_bytes()
        data = (
            data[:-37] if case == "truncated" else data[:200] + b"\x00garbage\xff" * 50 + data[600:]
        )
        target.mkdir()
        (target / source.name).write_bytes(data)
        args = ["report", "--strict", str(target), "-o", str(tmp_path / "out")]
        expected = "corrupt or truncated event file"
    else:
        args = ["report", str(tmp_path), "--format", "pdf", "-o", str(tmp_path / "out")]
        expected = "unknown format 'pdf'"
    args = (args or ["report", str(target), "-o", str(tmp_path / "out")]) + ["--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fisher-monitor: error:") and expected in err[0]
    assert "Traceback" not in err[0]


def test_a_truncated_run_is_reported_with_the_skipped_bytes(tmp_path, capsys):
    """Issue 12, item 5: the default reads what can be read and says what it skipped."""
    run = fisher_run(tmp_path / "run")
    (path,) = run.glob("events.out.tfevents.*")
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-37])
    assert main(["report", str(run), "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    (warning,) = [line for line in err.splitlines() if "warning" in line]
    assert warning.startswith(f"fisher-monitor: warning: {path}: read ")
    assert f"of {size - 37:,} bytes (a partial record" in warning
    assert "skipped the last" in (tmp_path / "out" / "report.md").read_text()
    document = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert document["runs"][0]["read_notes"] == [warning.split("warning: ", 1)[1]]


def test_one_unreadable_run_in_a_parent_is_skipped(tmp_path, capsys):
    """Issue 12, item 5: the other runs are reported."""
    parent = tmp_path / "logs"
    fisher_run(parent / "a")
    fisher_run(parent / "b")
    (parent / "c").mkdir()
    (parent / "c" / "events.out.tfevents.1.host.1.0").write_bytes(b"\xff" * 100)
    assert main(["report", str(parent), "-o", str(tmp_path / "out"), "--format", "json"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith(
        "fisher-monitor: warning: skipped run logs/c:"
    )
    names = [
        run["name"] for run in json.loads((tmp_path / "out" / "summary.json").read_text())["runs"]
    ]
    assert names == ["logs/a", "logs/b"]


@pytest.mark.parametrize("problem", ["file_in_the_way", "not_writable"])
def test_output_directory_problems_exit_2_before_loading(problem, tmp_path, capsys, monkeypatch):
    """Issue 12, item 6: one line, exit code 2, and no log is read first."""
    run = fisher_run(tmp_path / "run")
    out = tmp_path / "out"
    if problem == "file_in_the_way":
        out.write_text("")
        expected = f"cannot create output directory {out}: a file is in the way"
    else:

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr("fisher_monitor.report.render.tempfile.mkstemp", refuse)
        expected = f"cannot write to output directory {out}: Permission denied"

    def no_loading(*args, **kwargs):
        raise AssertionError("the logs were read before the output directory was checked")

    monkeypatch.setattr("fisher_monitor.report.load.load_runs", no_loading)
    assert main(["report", str(run), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fisher-monitor: error: {expected}"]


def test_plain_progress_is_one_line_per_stage(tmp_path, capsys):
    """Issue 12, item 7: without a terminal, a line per stage with its size."""
    run = fisher_run(tmp_path / "run", histograms=True)
    size = sum(f.stat().st_size for f in run.glob("events.out.tfevents.*"))
    assert main(["report", str(run), "-o", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "fisher-monitor: finding runs",
        f"fisher-monitor: reading events of 1 run ({size / 1024:,.0f} kB)",
        "fisher-monitor: drawing figures (6 figures)",
        "fisher-monitor: writing html, md, json (3 files)",
    ]


def test_terminal_progress_is_a_bar_with_counts():
    """Issue 12, item 7: on a terminal, a rich bar that shows how much is done."""
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=True, width=120, color_system=None)
    progress = for_console(console)
    assert isinstance(progress, RichProgress)
    progress.stage("reading events of 2 runs", 3 * 2**20, "bytes")
    progress.advance(2**20)
    progress.warn("a \x1b[2Jwarning")
    progress.stage("drawing figures", 7, "figures")
    progress.advance(3)
    progress.close()
    shown = stream.getvalue()
    assert "reading events of 2 runs" in shown and "3 MB / 3 MB" in shown
    assert "drawing figures" in shown and "7/7 figures" in shown
    assert "warning: a \\x1b[2Jwarning" in shown and "\x1b[2J" not in shown
    assert not isinstance(for_console(Console(file=io.StringIO())), RichProgress)
    assert isinstance(for_console(Console(file=io.StringIO())), LineProgress)


def test_summary_prints_every_verdict_and_an_honest_table(tmp_path, capsys):
    """Issue 10, item 5: every verdict (the hidden trace mismatch too), named columns."""
    steps = [0, 10, 20, 30, 40, 50]
    values = {
        "block/direction_cosine/all": [0.9, 0.2, 0.8, 0.7, 0.6, 0.5],  # worst at step 10
        "block/direction_cosine/fc1": [0.1, 0.95, 0.9, 0.9, 0.9, 0.9],  # its own low at 0
        "block/trace_ratio/all": [1.0] * 6,
        "block/rel_error/all": [0.9] * 6,
    }
    info = {"layers": layer_entries(["fc1", "fc2"], dimension=123456)}
    run = fisher_run(tmp_path / "run", steps=steps, values=values, info=info)
    assert main(["summary", str(run)]) == 0
    out = capsys.readouterr().out
    for topic in ("preconditioning", "matrix", "scale", "trace"):
        assert f"] {topic}: " in out
    assert "The trace hides a mismatch" in out
    assert "values at the last measurement (step 50)" in out
    assert "cos at step 10, the worst step of the whole network" in out
    assert "lowest cos of this layer over the run (step)" in out
    (fc1,) = [line for line in out.splitlines() if line.startswith("fc1 ")]
    cells = fc1.split()
    assert cells[1] == "123,456"  # dimensions as whole numbers
    assert cells[2] == "0.900"  # the last step
    assert cells[-3:] == ["0.950", "0.100", "(0)"]  # at the network's worst step; its own lowest


def test_summary_escapes_terminal_sequences_in_names(tmp_path, capsys):
    """Issue 12, item 8: a layer name cannot drive the terminal."""
    hostile = "evil\x1b]0;pwned\x07\x1b[31mred\u202e"
    info = {"layers": layer_entries([hostile]), "notes": ["\x1b[2J"]}
    run = fisher_run(tmp_path / "run\x1b[1m", layers=[hostile], info=info)
    assert main(["summary", str(run)]) == 0
    captured = capsys.readouterr()
    for stream in (captured.out, captured.err):
        assert "\x1b" not in stream and "\x07" not in stream and "\u202e" not in stream
    assert "evil\\x1b]0;pwned\\x07\\x1b[31mred\\u202e" in captured.out


def test_help_and_version_start_fast():
    """Issue 14, item 4: no training stack is imported before the arguments are parsed."""
    for args in (["--version"], ["--help"], ["report", "--help"]):
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "fisher_monitor", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        elapsed = time.perf_counter() - start
        assert result.returncode == 0, result.stderr
        assert elapsed < 2.0, f"fisher-monitor {' '.join(args)} took {elapsed:.2f} s"
    code = (
        "import sys; from fisher_monitor.report.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'lightning', 'pytorch_lightning', 'backpack', "
        "'matplotlib') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip().splitlines()[-1] == "[]"
