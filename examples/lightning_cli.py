"""Add FisherMonitor to a LightningCLI project from its YAML config, no code change.

    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml
    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml \\
        --trainer.max_epochs=1            # any option can still be overridden

The config (``lightning_cli.yaml``) lists the callback under ``trainer.callbacks`` with its
arguments, a log-spaced schedule included; on the command line the same works with
``--trainer.callbacks+=fisher_monitor.FisherMonitor --trainer.callbacks.every_n_steps=50``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DigitsClassifier, digits, loaders, quiet  # noqa: E402


class DigitsData(pl.LightningDataModule):
    """scikit-learn's digits as a DataModule."""

    def __init__(self, batch_size: int = 64):
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        self.train_loader, self.val_loader = loaders(*digits(), batch_size=self.batch_size)

    def train_dataloader(self):
        return self.train_loader

    def val_dataloader(self):
        return self.val_loader


class DigitsModel(DigitsClassifier):
    """The quickstart MLP, with its width and learning rate configurable from the CLI."""

    def __init__(self, hidden: int = 128, lr: float = 1e-3):
        super().__init__(hidden=hidden, lr=lr)


def main(args: list[str] | None = None) -> LightningCLI:
    quiet()
    return LightningCLI(DigitsModel, DigitsData, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
