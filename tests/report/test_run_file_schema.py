"""Issue 21, item 5: a malformed run file is one line naming the file and the field, exit 2.

Before, ``"fit": "x"`` or ``"settings": "x"`` gave a ``ValueError`` traceback, ``"notes":
5`` a ``TypeError``, deeply nested JSON a ``RecursionError``; a run directory whose name
is not UTF-8 crashed the HTML report inside matplotlib. Fuzzed over every field.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fisher_monitor import runinfo
from fisher_monitor.report.cli import main
from synthetic import fisher_run, layer_entries

RUN_FILE = "fisher_monitor-fisher.json"


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("schema") / "run"
    return fisher_run(
        run,
        info={
            "settings": {"structures": ["block"], "damping": 0.001, "optimizer": "SGD"},
            "layers": layer_entries(("fc1", "fc2")),
            "notes": ["a note"],
            "fit": {"measurements": 6, "steps": [0, 10], "overhead": 0.1, "warnings": []},
        },
    )


def with_field(run: Path, field: str, value, raw: str | None = None) -> Path:
    """Replace ``field`` (dotted for nested fields) of the run file; ``raw`` replaces it all."""
    path = run / RUN_FILE
    if raw is not None:
        path.write_text(raw)
        return path
    data = json.loads(path.read_text())
    where = data
    *parents, name = field.split(".")
    for parent in parents:
        where = where[parent] if not parent.isdigit() else where[int(parent)]
    where[name if not name.isdigit() else int(name)] = value
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def run(good_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(good_run, copy)
    return copy


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fisher-monitor: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("fit", "x", "field 'fit' must be an object, got a string ('x')"),
        ("settings", "x", "field 'settings' must be an object, got a string ('x')"),
        ("notes", 5, "field 'notes' must be a list, got a number (5)"),
        ("notes", [1], "field 'notes' must be a list of strings, got a number (1)"),
        ("layers", "x", "field 'layers' must be a list"),
        ("layers.0", 5, "field 'layers[0]' must be an object with a 'layer' name"),
        ("layers.0.layer", 5, "field 'layers[0].layer' must be a string"),
        ("layers.1.dimension", "10", "field 'layers[1].dimension' must be a whole number ≥ 0"),
        ("layers.0.measured", "yes", "field 'layers[0].measured' must be true or false"),
        ("fit.overhead", "x", "field 'fit.overhead' must be a number"),
        ("fit.steps", [0, "a"], "field 'fit.steps' must be a list of whole numbers"),
        ("fit.measurements", -1, "field 'fit.measurements' must be a whole number ≥ 0"),
        ("settings.damping", "0.1", "field 'settings.damping' must be a number or a list"),
        ("settings.structures", "block", "field 'settings.structures' must be a list of strings"),
        ("settings.optimizer", 3, "field 'settings.optimizer' must be a string or null"),
        ("prefix", "", "field 'prefix' must be a non-empty string"),
        ("version", "1", "field 'version' must be a whole number ≥ 1"),
    ],
)
@pytest.mark.parametrize("command", ["summary", "report"])
def test_a_bad_field_is_one_line_naming_file_and_field(
    run, tmp_path, capsys, field, value, named, command
):
    path = with_field(run, field, value)
    args = [command, str(run), "--quiet"] + (
        ["-o", str(tmp_path / "out")] if command == "report" else []
    )
    assert main(args) == 2
    assert one_error_line(capsys).startswith(f"fisher-monitor: error: {path}: {named}")


@pytest.mark.parametrize(
    "raw, named",
    [
        ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
        (
            '{"format": "fisher-monitor-run", "prefix": "fisher", "settings": '
            + "[" * 5000
            + "]" * 5000
            + "}",
            "JSON nested too deeply",
        ),
        ("{not json", "not valid JSON"),
        (b"\xff\xfe{}".decode("latin-1"), "not valid JSON"),
    ],
)
def test_unreadable_json_is_one_line(run, capsys, raw, named):
    path = with_field(run, "", None, raw=raw)
    assert main(["summary", str(run), "--quiet"]) == 2
    assert one_error_line(capsys).startswith(f"fisher-monitor: error: {path}: ")
    capsys.readouterr()
    with_field(run, "", None, raw=raw)
    assert main(["summary", str(run), "--quiet"]) == 2
    assert named in one_error_line(capsys)


def test_bytes_that_are_not_utf8(run, capsys):
    (run / RUN_FILE).write_bytes(b'{"format": "fisher-monitor-run", "prefix": "\xff"}')
    assert main(["summary", str(run), "--quiet"]) == 2
    assert "not a run file (not UTF-8 text)" in one_error_line(capsys)


def test_a_parent_directory_skips_the_bad_run_and_reports_the_others(run, tmp_path, capsys):
    parent = run.parent
    fisher_run(parent / "other")
    with_field(run, "fit", "x")
    assert main(["summary", str(parent)]) == 0  # warnings are progress output
    captured = capsys.readouterr()
    assert "other" in captured.out and "field 'fit' must be an object" in captured.err


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "version",
    "prefix",
    "settings",
    "layers",
    "notes",
    "fit",
    *(f"settings.{name}" for name in runinfo.SETTINGS),
    *(f"layers.0.{name}" for name in runinfo.LAYER),
    *(f"fit.{name}" for name in runinfo.FIT),
]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(field=st.sampled_from(FIELDS), value=JSON)
def test_fuzzed_fields_load_or_fail_with_one_line(good_run, tmp_path_factory, field, value):
    copy = tmp_path_factory.mktemp("fuzz") / "run"
    shutil.copytree(good_run, copy)
    path = with_field(copy, field, value)
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        code = main(["summary", str(copy), "--quiet"])
    assert code in (0, 2)
    if code == 2:
        (line,) = err.getvalue().strip().splitlines()
        assert line.startswith(f"fisher-monitor: error: {path}: ")
        top = field.split(".")[0]
        assert f"field '{top}" in line
    else:
        assert "Traceback" not in err.getvalue()


def test_a_run_directory_whose_name_is_not_utf8(tmp_path, capsys):
    """The HTML report crashed inside matplotlib (``set_text(): incompatible arguments``)."""
    written = fisher_run(
        tmp_path / "plain", histograms=True, info={"layers": layer_entries(("fc1", "fc2"))}
    )
    run = tmp_path / os.fsdecode(b"run\xff\xfename")  # TensorBoard's writer cannot make it
    written.rename(run)
    out = tmp_path / "out"
    assert main(["report", str(run), "-o", str(out), "--quiet"]) == 0
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "run\\udcff\\udcfename" in html
    document = json.loads((out / "summary.json").read_text())
    assert document["runs"][0]["name"] == "run\\udcff\\udcfename"
    assert main(["summary", str(run), "--quiet"]) == 0
    assert "run\\udcff\\udcfename" in capsys.readouterr().out


def test_runs_told_apart_by_parents_that_are_not_utf8(tmp_path):
    runs = []
    for parent in (b"a\xff", b"b\xfe"):
        written = fisher_run(tmp_path / "plain")
        run = tmp_path / os.fsdecode(parent) / "version_0"
        run.parent.mkdir()
        written.rename(run)
        runs.append(str(run))
    out = tmp_path / "out"
    assert main(["report", *runs, "-o", str(out), "--quiet"]) == 0
    names = [run["name"] for run in json.loads((out / "summary.json").read_text())["runs"]]
    assert names == ["a\\udcff/version_0", "b\\udcfe/version_0"]
