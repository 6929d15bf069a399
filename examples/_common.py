"""Shared pieces of the examples: fast mode, output folders, scikit-learn's bundled data."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

EXAMPLES = Path(__file__).resolve().parent


def fast_mode() -> bool:
    """Whether to run small (``--fast`` or ``FISHER_MONITOR_FAST=1``): used by the tests."""
    return "--fast" in sys.argv or os.environ.get("FISHER_MONITOR_FAST", "") not in ("", "0")


def output_dir(name: str) -> Path:
    """``examples/output/<name>/`` (created)."""
    path = EXAMPLES / "output" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def quiet() -> None:
    """Silence Lightning's tips and PyTorch's user warnings in example output.

    FisherMonitor's own lines (the start line and the end-of-fit summary, which go out
    through Lightning's rank-zero logging) are kept.
    """
    warnings.filterwarnings("ignore")
    import logging

    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        rank_zero = logging.getLogger(name)
        rank_zero.setLevel(logging.INFO)
        rank_zero.addFilter(lambda record: record.getMessage().startswith("FisherMonitor"))


def standardize(x: np.ndarray) -> np.ndarray:
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)


def linear_model(theta, bias: bool = True) -> nn.Linear:
    """A one-output float64 ``nn.Linear`` whose weights (then bias, if any) are ``theta``."""
    theta = torch.as_tensor(theta, dtype=torch.float64)
    features = theta.numel() - int(bias)
    model = nn.Linear(features, 1, bias=bias).double()
    with torch.no_grad():
        model.weight.copy_(theta[:features].reshape(1, features))
        if bias:
            model.bias.copy_(theta[features:])
    return model


def digits(seed: int = 0, image: bool = False) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 8×8 digits, standardised, split 1500 / 297 (train / validation)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = standardize(data.data).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = torch.from_numpy(x[order]), torch.from_numpy(y[order])
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return TensorDataset(x[:1500], y[:1500]), TensorDataset(x[1500:], y[1500:])


class DigitsClassifier(pl.LightningModule):
    """An MLP (or a given network) on digits, holding its loss as an attribute."""

    def __init__(self, net: nn.Module | None = None, hidden: int = 128, lr: float = 1e-3):
        super().__init__()
        self.net = net or nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )
        self.loss_fn = nn.CrossEntropyLoss()
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", self.loss_fn(logits, y))
        self.log("val/accuracy", (logits.argmax(dim=1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def loaders(train: TensorDataset, val: TensorDataset, batch_size: int = 64):
    generator = torch.Generator().manual_seed(0)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator),
        DataLoader(val, batch_size=256),
    )
