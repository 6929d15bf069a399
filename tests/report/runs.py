"""Real short training runs with FisherMonitor, for the report tests."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from fisher_monitor import FisherMonitor
from lightning_helpers import TinyClassifier, loader, trainer_kwargs
from synthetic import HOSTILE_LAYER


class HostileNames(TinyClassifier):
    """A network whose layer name is HTML, as user code can make it."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            OrderedDict(
                [(HOSTILE_LAYER, nn.Linear(4, 6)), ("act", nn.Tanh()), ("out", nn.Linear(6, 3))]
            )
        )


def train(root: Path, name: str, model, steps: int = 12, **monitor_kwargs) -> Path:
    torch.manual_seed(0)
    logger = TensorBoardLogger(root, name=name)
    monitor = FisherMonitor(
        **{"every_n_steps": 2, "structures": ("diag", "block", "kron"), **monitor_kwargs}
    )
    trainer = pl.Trainer(max_steps=steps, logger=logger, callbacks=[monitor], **trainer_kwargs())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader(shuffle=True))
    return Path(logger.log_dir)
