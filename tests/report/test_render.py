"""HTML, Markdown and JSON outputs from synthetic runs: escaping, standard errors, verdicts."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest
from markdown_it import MarkdownIt

from fisher_monitor.report.load import ReportError, load_runs
from fisher_monitor.report.render import prepare_output_dir, summary, write_report
from fisher_monitor.report.text import markdown_code, markdown_text, terminal_safe
from synthetic import HOSTILE_LAYER, fisher_run, layer_entries


class Tags(HTMLParser):
    """Every start tag with its attributes, and the page's text."""

    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(html: str) -> Tags:
    page = Tags()
    page.feed(html)
    return page


HOSTILE_RUN = "<img src=x onerror=alert(1)>"
HOSTILE_SETTING = "<b onmouseover=alert(2)>bold</b>"
HOSTILE_NOTE = "<script>alert(3)</script> [link](javascript:alert(4)) | cell"


@pytest.fixture
def hostile_report(tmp_path):
    """Issue 12, item 8: user strings everywhere a report shows text."""
    layers = (HOSTILE_LAYER, "a`b`c", "1. list")
    run = fisher_run(
        tmp_path / HOSTILE_RUN,
        layers=layers,
        info={
            "settings": {"fisher": HOSTILE_SETTING, "optimizer": "<i>Adam</i>"},
            "layers": layer_entries(layers),
            "notes": [HOSTILE_NOTE, "# heading\nsecond line"],
        },
        histograms=True,
    )
    out = tmp_path / "out"
    write_report(load_runs([run]), out)
    return out


def test_html_shows_every_user_string_as_text(hostile_report):
    html = (hostile_report / "report.html").read_text()
    page = parse(html)
    tags = [tag for tag, _ in page.tags]
    assert "script" not in tags and "b" not in tags and "i" not in tags
    assert all(
        a.get("src", "").startswith("data:image/png;base64,") for t, a in page.tags if t == "img"
    )
    assert not any(name.startswith("on") for _, attrs in page.tags for name in attrs)
    text = "".join(page.text)
    for shown in (HOSTILE_LAYER, HOSTILE_RUN, HOSTILE_SETTING, "<script>alert(3)</script>"):
        assert shown in text


def test_markdown_rendered_as_html_has_no_live_markup(hostile_report):
    markdown = (hostile_report / "report.md").read_text()
    rendered = MarkdownIt("commonmark").enable("table").render(markdown)
    page = parse(rendered)
    tags = {tag for tag, _ in page.tags}
    assert "script" not in tags and "b" not in tags and "i" not in tags and "ol" not in tags
    assert not any(a.get("href", "").startswith("javascript") for t, a in page.tags if t == "a")
    assert all(a.get("src", "").endswith(".png") for t, a in page.tags if t == "img")
    text = "".join(page.text)
    for shown in (HOSTILE_LAYER, HOSTILE_RUN, HOSTILE_SETTING, "a`b`c", "1. list"):
        assert shown in text, shown
    # the headings are the report's own: a note cannot open one
    assert [t for t, _ in page.tags if t in ("h1", "h2")].count("h1") == 1


def test_markdown_escapes_by_hand():
    assert markdown_text("<b>x</b>") == r"\<b\>x\</b\>"
    assert markdown_text("a|b") == r"a\|b" and markdown_text("net.0") == "net.0"
    assert markdown_text("1. x", starts_block=True) == r"1\. x"
    assert markdown_text("# x", starts_block=True) == r"\# x"
    assert markdown_code("a`b") == "``a`b``" and markdown_code("`x") == "`` `x ``"


def test_terminal_escapes():
    assert terminal_safe("a\x1b[31mred\x07\u202ex") == "a\\x1b[31mred\\x07\\u202ex"
    assert terminal_safe("ok.layer-1") == "ok.layer-1"


def test_standard_errors_are_shown_and_kept(tmp_path):
    """Issue 11: an estimated metric reads ``value ± se``; the JSON carries the error."""
    steps = [0, 10, 20, 30, 40, 50]
    values = {
        "block/direction_cosine/all": [0.5] * 6,
        "block/direction_cosine_se/all": [0.012] * 6,
        "block/kl_se/fc1": [0.25] * 6,
    }
    run = fisher_run(tmp_path / "run", steps=steps, values=values)
    (loaded,) = load_runs([run])
    document = summary([loaded])
    layers = document["runs"][0]["layers"]
    assert layers["all"]["last"]["direction_cosine_se"] == pytest.approx(0.012)
    assert layers["fc1"]["last"]["kl_se"] == 0.25
    assert document["runs"][0]["final"]["block/direction_cosine_se/all"] == pytest.approx(0.012)
    write_report([loaded], tmp_path / "out", ["html", "md"])
    assert "0.500 ± 0.012" in (tmp_path / "out" / "report.html").read_text()
    assert "0.500 ± 0.012" in (tmp_path / "out" / "report.md").read_text()


def test_optimizer_verdict_and_figure_in_every_format(tmp_path):
    """Issue 13, item 4 (report side)."""
    steps = [0, 10, 20, 30, 40, 50]
    values = {
        "block/update_nat_cosine/all": [0.2] * 6,
        "block/update_ef_cosine/all": [0.9] * 6,
        "block/update_grad_cosine/all": [0.5] * 6,
        "optimizer/preconditioner_ef_cosine/all": [0.93] * 6,
        "optimizer/preconditioner_fisher_cosine/all": [0.41] * 6,
    }
    run = fisher_run(
        tmp_path / "run", steps=steps, values=values, info={"settings": {"optimizer": "AdamW"}}
    )
    written = write_report(load_runs([run]), tmp_path / "out")
    document = json.loads(written["json"].read_text())
    (optimizer,) = [v for v in document["runs"][0]["verdicts"] if v["topic"] == "optimizer"]
    assert optimizer["text"].startswith("AdamW's steps pointed within 60°")
    assert optimizer["numbers"]["median_preconditioner_ef_cosine"] == pytest.approx(0.93)
    assert "AdamW&#39;s steps pointed within 60°" in written["html"].read_text()
    assert 'id="figure-optimizer"' in written["html"].read_text()
    assert "optimizer (note)" in written["md"].read_text()  # Adam far from NG: no fault
    assert (tmp_path / "out" / "optimizer.png").stat().st_size > 1000


def test_the_headline_tops_every_format(tmp_path):
    """Issue 22: one line for the user's optimizer first, with where to read on."""
    steps = [0, 10, 20, 30, 40, 50]
    values = {
        "block/direction_cosine/all": [0.2] * 6,
        "block/update_nat_cosine/all": [0.2] * 6,
        "optimizer/preconditioner_ef_cosine/all": [0.93] * 6,
        "optimizer/preconditioner_fisher_cosine/all": [0.41] * 6,
    }
    info = {"settings": {"optimizer": "SGD", "preconditioner": False}}
    run = fisher_run(tmp_path / "run", steps=steps, values=values, info=info)
    written = write_report(load_runs([run]), tmp_path / "out")
    document = json.loads(written["json"].read_text())
    line = document["runs"][0]["headline"]
    assert line["topic"] == "headline" and line["level"] == "info"
    assert line["text"].startswith("For your SGD training: SGD keeps no squared-gradient")
    assert line["links"] == ["docs/guide/acting.md#sgd", "docs/glossary.md#natural-gradient"]
    html = written["html"].read_text()
    verdicts = html.index('id="verdict"')
    first = html.index('class="verdict headline info"')
    assert verdicts < first < html.index("verdict bad") and "in short · note" in html
    assert '<code class="doc">docs/guide/acting.md#sgd</code>' in html
    assert "A = F̃" not in html and "F̃ = F + λI and ẼF = EF + λI" in html
    markdown = written["md"].read_text()
    assert markdown.index("**In short (note)**: For your SGD training") < markdown.index("- **")


def test_projection_semantics_are_stated(tmp_path):
    """Issue 16, item 3: `all` of a projection is a sum over layers."""
    written = write_report(load_runs([fisher_run(tmp_path / "run")]), tmp_path / "out")
    for text in (written["html"].read_text(), written["md"].read_text()):
        assert "at most 1 per layer" in text and "sum" in text


def test_insufficient_evidence_suggests_what_to_change(tmp_path):
    run = fisher_run(tmp_path / "run", steps=[0])
    written = write_report(load_runs([run]), tmp_path / "out", ["html", "md", "json"])
    document = json.loads(written["json"].read_text())
    levels = {v["level"] for v in document["runs"][0]["verdicts"]}
    assert levels == {"insufficient"}
    assert document["runs"][0]["advice"] and "schedules.budget" in document["runs"][0]["advice"][0]
    html = written["html"].read_text()
    assert "insufficient evidence" in html and "What to change" in html


def test_output_directory_problems_are_report_errors(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ReportError, match="cannot create output directory .*file"):
        prepare_output_dir(blocker)
    with pytest.raises(ReportError, match="cannot create output directory|cannot write"):
        prepare_output_dir(blocker / "below")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("fisher_monitor.report.render.tempfile.mkstemp", refuse)
    with pytest.raises(ReportError, match="cannot write to output directory .*: Permission denied"):
        prepare_output_dir(tmp_path / "fine")
