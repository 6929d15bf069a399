"""Every code block of the README runs: Python blocks in order, and the `fisher-monitor` lines."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from fisher_monitor.report.cli import main as cli

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.DOTALL)


@pytest.mark.slow
def test_readme_code_blocks_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    python = blocks("python")
    assert len(python) >= 3
    namespace: dict = {}
    exec(compile(python[0], "README.md[quickstart]", "exec"), namespace)
    exec(compile(python[0], "README.md[quickstart, second run]", "exec"), namespace)
    for index, code in enumerate(python[1:], start=1):
        exec(compile(code, f"README.md[block {index}]", "exec"), namespace)
    assert -1.0 <= namespace["m"]["block/direction_cosine/all"] <= 1.0
    assert (tmp_path / "runs" / "quickstart" / "version_1").is_dir()
    commands = [
        line.split("#")[0].strip()
        for block in blocks("bash")
        for line in block.splitlines()
        if line.startswith("fisher-monitor ")
    ]
    assert len(commands) == 3
    for command in commands:
        assert cli(shlex.split(command)[1:]) == 0, command
    assert (tmp_path / "report" / "report.html").exists()
    assert (tmp_path / "comparison" / "summary.json").exists()


def test_readme_make_targets_exist():
    makefile = (README.parent / "Makefile").read_text()
    for target in ("demo", "test", "bench", "lint"):
        assert re.search(rf"^{target}:", makefile, flags=re.MULTILINE), target
    assert os.access(README.parent / ".ci" / "run", os.X_OK)
