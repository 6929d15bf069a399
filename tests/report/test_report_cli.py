"""`fisher-monitor report` and `summary` on real runs: files, contents, numbers, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fisher_monitor.report.cli import main
from runs import HOSTILE_LAYER


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
    assert len(page.images) == 6 and all(
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
    assert logged["fisher/block/direction_cosine/all"][worst] == min(
        logged["fisher/block/direction_cosine/all"].values()
    )
    for layer in ("net.0", "net.3", "all"):
        for metric in (
            "direction_cosine",
            "trace_ratio",
            "rel_error",
            "kl",
            "nat_projection",
            "ef_projection",
            "dimension",
        ):
            for when, step in (("last", last), ("worst", worst)):
                expected = logged[f"fisher/block/{metric}/{layer}"][step]
                assert run["layers"][layer][when][metric] == pytest.approx(expected, rel=1e-6), (
                    layer,
                    metric,
                    when,
                )
    for key, value in run["final"].items():
        assert value == pytest.approx(logged[f"fisher/{key}"][last], rel=1e-6)
    headline = run["verdicts"][0]
    assert headline["topic"] == "preconditioning"
    cosines = list(logged["fisher/block/direction_cosine/all"].values())
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
    assert "net.0" in out and "net.3" in out and "cos worst" in out
    assert "measurements" in out and "EF direction" in out


def test_python_dash_m_and_help():
    result = subprocess.run(
        [sys.executable, "-m", "fisher_monitor", "report", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for option in ("RUN", "--out-dir", "--format", "--title"):
        assert option in result.stdout


def write_plain_tensorboard_run(directory: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(directory))
    writer.add_scalar("train/loss", 1.0, 0)
    writer.close()


@pytest.mark.parametrize(
    "case", ["missing", "empty_dir", "no_fisher_data", "truncated", "garbage", "bad_format"]
)
def test_bad_input_exits_2_with_one_line(case, plain_run, tmp_path, capsys):
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
        target.mkdir()
        (source,) = plain_run.glob("events.out.tfevents.*")
        data = source.read_bytes()
        data = (
            data[:-37] if case == "truncated" else data[:200] + b"\x00garbage\xff" * 50 + data[600:]
        )
        (target / source.name).write_bytes(data)
        expected = "corrupt or truncated event file"
    else:
        args = ["report", str(plain_run), "--format", "pdf", "-o", str(tmp_path / "out")]
        expected = "unknown format 'pdf'"
    args = args or ["report", str(target), "-o", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fisher-monitor: error:") and expected in err[0]
    assert "Traceback" not in err[0]
