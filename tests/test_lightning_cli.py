"""FisherMonitor configured from LightningCLI: command-line flags and a YAML config."""

from __future__ import annotations

import warnings

import pytest
from pytorch_lightning.cli import LightningCLI

from fisher_monitor import FisherMonitor, schedules
from lightning_helpers import TinyClassifier, TinyData

pytest.importorskip("jsonargparse")


def make_cli(args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LightningCLI(
            TinyClassifier, TinyData, run=False, args=args, save_config_callback=None
        )


def test_callback_from_command_line_flags(tmp_path):
    cli = make_cli(
        [
            "--trainer.max_steps=3",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=fisher_monitor.FisherMonitor",
            "--trainer.callbacks.every_n_steps=2",
            "--trainer.callbacks.structures=[diag]",
            "--trainer.callbacks.damping=0.01",
        ]
    )
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, FisherMonitor)]
    assert monitor.settings.dampings == (0.01,)
    assert [s.value for s in monitor.settings.structures] == ["diag"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli.trainer.fit(cli.model, cli.datamodule)
    assert [step for step, _ in monitor.state_dict()["history"]] == [0, 2]


def test_callback_from_yaml_config_with_a_schedule(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  max_steps: 4
  accelerator: cpu
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: fisher_monitor.FisherMonitor
      init_args:
        schedule:
          class_path: fisher_monitor.schedules.log_spaced
          init_args:
            per_decade: 4
        structures: [diag, block]
        fisher: mc
        mc_samples: 2
        network: net
        loss_fn: cross_entropy
"""
    )
    cli = make_cli([f"--config={config}"])
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, FisherMonitor)]
    assert isinstance(monitor.schedule, schedules.log_spaced)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli.trainer.fit(cli.model, cli.datamodule)
    assert [step for step, _ in monitor.state_dict()["history"]] == [0, 1, 2]
