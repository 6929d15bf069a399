"""Every code block of the README runs on its own, as written, in the order a reader meets it.

Each Python block is executed in a fresh namespace (it must import what it uses); the
``fisher-monitor`` lines of the bash blocks run through the command's entry point after
the Python block that creates their runs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from fisher_monitor.report.cli import main as cli

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"```(python|bash)\n(.*?)```", flags=re.DOTALL)


def blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of the README's Python and bash blocks, in order."""
    return BLOCK.findall(README.read_text())


def commands(code: str) -> list[list[str]]:
    """The ``fisher-monitor`` command lines of a bash block, comments stripped."""
    lines = [line.split("#")[0].strip() for line in code.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("fisher-monitor ")]


@pytest.mark.slow
def test_readme_code_blocks_run_on_their_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = blocks()
    assert sum(language == "python" for language, _ in found) >= 4
    ran = 0
    for index, (language, code) in enumerate(found):
        if language == "python":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exec(compile(code, f"README.md[block {index}]", "exec"), {"__name__": "readme"})
        else:
            for arguments in commands(code):
                assert cli(arguments) == 0, arguments
                ran += 1
    assert ran >= 3
    assert (tmp_path / "report" / "report.html").exists()
    comparison = json.loads((tmp_path / "comparison" / "summary.json").read_text())
    assert len(comparison["runs"]) == 2  # the comparison compares the two runs it created


def test_readme_make_targets_exist():
    makefile = (README.parent / "Makefile").read_text()
    named = set(re.findall(r"`?make ([a-z-]+)", README.read_text()))
    assert {"demo", "test", "tensorboard", "report", "wheel"} <= named
    for target in named | {"bench", "lint", "docs"}:
        assert re.search(rf"^{target}:", makefile, flags=re.MULTILINE), target
    assert os.access(README.parent / ".ci" / "run", os.X_OK)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_tensorboard_and_report_run_the_environments_own_commands(tmp_path):
    """Issue 22, item 1: what `make demo` points to runs without activating .venv."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()  # newer than pyproject.toml: nothing to install
    result = subprocess.run(
        ["make", "-n", "tensorboard", "report", f"VENV={venv}", "RUN=runs/quickstart/version_3"],
        cwd=README.parent,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert f"{venv}/bin/tensorboard --logdir runs" in lines
    report = f"{venv}/bin/fisher-monitor report runs/quickstart/version_3"
    assert f"{report} -o runs/quickstart/version_3/report" in lines


def test_readme_uses_one_notation_and_shows_the_bottom_line_first():
    text = README.read_text()
    assert "A = F" not in text and "B = EF" not in text and "A⁻¹" not in text
    assert "F̃ = F_S + λI" in text and "docs/glossary.md" in text
    summary = text.split("<!-- demo-summary -->", 1)[1].split("<!-- /demo-summary -->", 1)[0]
    rows = summary.splitlines()
    first = rows[rows.index("FisherMonitor summary") + 1].strip()
    assert first.startswith("bottom line") and "docs/guide/acting.md#" in first


def test_readme_first_screen_shows_what_a_user_gets():
    """The dashboard and the end-of-fit summary come before the theory."""
    text = README.read_text()
    dashboard = text.index("docs/demo-dashboard.png")
    summary = text.index("FisherMonitor summary")
    theory = text.index("## What is measured")
    assert dashboard < theory and summary < theory
    assert (README.parent / "docs" / "demo-dashboard.png").exists()
