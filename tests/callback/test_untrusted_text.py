"""Issue 21, items 2 and 3: text from outside never stops the fit or reaches a terminal raw.

Layer names, logger names and versions, and causes quoted in warnings come from user code
and the file system: a name that is not valid UTF-8 is written as its escapes, and the
end-of-fit summary prints every cell literally (no ``rich`` markup, no escape sequences),
with the report command quoted for the shell. Real ``Trainer.fit`` runs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from fisher_monitor import FisherMonitor, runinfo
from fisher_monitor.callback import monitor as monitor_module
from fisher_monitor.callback import summary as summary_module
from fisher_monitor.report.cli import main
from lightning_helpers import TinyClassifier, fit

NOT_UTF8 = "layer\udcffname"  # what os.fsdecode makes of the bytes b"layer\xffname"
HOSTILE_VERSION = "v\x1b[2Jx[/x][bold]"


class OddNames(TinyClassifier):
    """A network whose first layer's name is not valid UTF-8."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            OrderedDict([(NOT_UTF8, nn.Linear(4, 6)), ("act", nn.Tanh()), ("out", nn.Linear(6, 3))])
        )


@pytest.fixture
def said(monkeypatch) -> list[str]:
    lines: list[str] = []
    monkeypatch.setattr(monitor_module, "rank_zero_info", lines.append)
    monkeypatch.setattr(summary_module, "rank_zero_info", lines.append)
    return lines


@pytest.mark.slow
def test_a_layer_name_that_is_not_utf8_is_logged_as_its_escapes(tmp_path, capsys):
    logger = TensorBoardLogger(tmp_path, name="odd")
    monitor = FisherMonitor(every_n_steps=1, structures=("diag", "block", "kron"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _, _ = fit(monitor, steps=12, logger=logger, model=OddNames())
    assert trainer.global_step == 12
    assert not [w for w in caught if "`FisherMonitor`" in str(w.message)]
    shown = NOT_UTF8.encode("utf-8", "backslashreplace").decode()  # layer\udcffname
    (info,) = runinfo.read(logger.log_dir).values()
    assert [layer["layer"] for layer in info["layers"]][0] == f"net.{shown}"
    assert main(["summary", logger.log_dir, "--quiet"]) == 0
    assert f"net.{shown}" in capsys.readouterr().out
    out = tmp_path / "report"
    assert main(["report", logger.log_dir, "-o", str(out), "--quiet"]) == 0
    assert f"net.{shown}" in (out / "report.html").read_text(encoding="utf-8")


def test_the_summary_prints_logger_paths_literally(tmp_path, said):
    logger = TensorBoardLogger(tmp_path, name="sweep[lr=0.1]", version=HOSTILE_VERSION)
    fit(FisherMonitor(every_n_steps=1), steps=3, logger=logger)
    table = said[-1]
    assert "\x1b" not in table
    escaped = logger.log_dir.replace("\x1b", "\\x1b")
    assert f"TensorBoard run             {escaped}" in table
    assert f"fisher-monitor report {shlex.quote(logger.log_dir)}".replace("\x1b", "\\x1b") in table


def test_the_rich_summary_on_a_terminal_shows_markup_as_text(tmp_path, monkeypatch, capsys):
    """A version like ``v[/x]`` made ``fit`` raise MarkupError; ``[lr=0.1]`` vanished."""
    monkeypatch.setattr(summary_module.sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("COLUMNS", "400")
    logger = TensorBoardLogger(tmp_path, name="sweep[lr=0.1]", version=HOSTILE_VERSION)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _, _ = fit(FisherMonitor(every_n_steps=1), steps=3, logger=logger)
    assert trainer.global_step == 3
    assert not [w for w in caught if "`FisherMonitor`" in str(w.message)]
    printed = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)  # rich's own styles
    assert "\x1b[2J" not in printed
    directory = str(Path(tmp_path) / "sweep[lr=0.1]" / "v\\x1b[2Jx[/x][bold]")
    assert directory in printed
    assert f"fisher-monitor report '{directory}'" in printed


def test_warnings_show_control_characters_as_escapes(tmp_path):
    class Hostile(TinyClassifier):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)

    def split(batch):
        raise ValueError("bad batch \x1b[31mred\x1b[0m")

    monitor = FisherMonitor(every_n_steps=1, batch_to_inputs_targets=split)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(monitor, steps=2, model=Hostile())
    (warning,) = [str(w.message) for w in caught if "`FisherMonitor`" in str(w.message)]
    assert "\x1b" not in warning and "bad batch \\x1b[31mred\\x1b[0m" in warning


def test_the_run_file_has_the_permissions_of_the_other_logs(tmp_path):
    """Issue 21, item 8: not the 0600 of a temporary file."""
    logger = TensorBoardLogger(tmp_path)
    fit(FisherMonitor(every_n_steps=1), steps=2, logger=logger)
    directory = Path(logger.log_dir)
    (run_file,) = directory.glob("fisher_monitor-*.json")
    (events,) = directory.glob("events.out.tfevents.*")
    umask = os.umask(0)
    os.umask(umask)
    assert run_file.stat().st_mode & 0o777 == events.stat().st_mode & 0o777 == 0o666 & ~umask
    assert not list(directory.glob(".*.tmp"))
    assert json.loads(run_file.read_text())["fit"]["measurements"] == 2
