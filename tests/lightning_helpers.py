"""Tiny LightningModules, data and a spy logger for the callback tests (LightningCLI-importable)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class SpyLogger(Logger):
    """Records every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, dict[str, float]]] = []
        self.hparams: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return "spy"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.hparams.update(dict(params) if isinstance(params, dict) else vars(params))

    def steps_with(self, key: str) -> list[int]:
        return [step for step, metrics in self.calls if key in metrics]

    def value(self, key: str, step: int) -> float:
        return next(metrics[key] for s, metrics in self.calls if s == step and key in metrics)


class TinyClassifier(pl.LightningModule):
    """An MLP classifier holding its loss as an attribute, as most LightningModules do."""

    def __init__(self, hidden: int = 8, dropout: float = 0.0, lr: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, 3)
        )
        self.loss_fn = nn.CrossEntropyLoss()
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = self.loss_fn(self(inputs), targets)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def dataset(n: int = 64, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 4, generator=generator)
    targets = (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0.5).long()
    return TensorDataset(inputs, targets)


def loader(n: int = 64, batch_size: int = 16, shuffle: bool = False, seed: int = 0) -> DataLoader:
    return DataLoader(dataset(n, seed), batch_size=batch_size, shuffle=shuffle)


class TinyData(pl.LightningDataModule):
    """The same data as :func:`loader`, as a DataModule (for LightningCLI)."""

    def __init__(self, batch_size: int = 16):
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return loader(batch_size=self.batch_size)


def trainer_kwargs(**overrides) -> dict[str, Any]:
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        deterministic=True,
    )
    kwargs.update(overrides)
    return kwargs


class MappedDataset(torch.utils.data.Dataset):
    """The tiny data set with ``transform(index, inputs, target)`` applied to each item."""

    def __init__(self, transform: Callable[[int, torch.Tensor, torch.Tensor], Any]):
        self.base = dataset()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Any:
        inputs, target = self.base[index]
        return self.transform(index, inputs, target)


class DigitsMLP(pl.LightningModule):
    """A small MLP on scikit-learn's 8×8 digits (64 → 32 → 10), SGD."""

    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.loss_fn = nn.CrossEntropyLoss()
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = self.loss_fn(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def digits_loader(batch_size: int = 32, shuffle: bool = True) -> DataLoader:
    """scikit-learn's bundled digits (1797 images, pixels scaled to [0, 1])."""
    from sklearn.datasets import load_digits

    inputs, targets = load_digits(return_X_y=True)
    data = TensorDataset(
        torch.tensor(inputs / 16.0, dtype=torch.float32), torch.tensor(targets, dtype=torch.long)
    )
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle)


class FakeClock:
    """A clock for time-based schedules that only moves when told (deterministic tests)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Ticker(pl.Callback):
    """Advances a :class:`FakeClock` by ``step_seconds`` after every training batch."""

    def __init__(self, clock: FakeClock, step_seconds: float):
        self.clock = clock
        self.step_seconds = step_seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.clock.now += self.step_seconds


class TickingLogger(SpyLogger):
    """A spy logger that advances a :class:`FakeClock` by ``seconds`` for each measurement it
    receives, as if the measurement had taken that long."""

    def __init__(self, clock: FakeClock, seconds: float, prefix: str = "~fisher/"):
        super().__init__()
        self.clock = clock
        self.seconds = seconds
        self.prefix = prefix

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        if any(key.startswith(self.prefix + "probe/loss") for key in metrics):
            self.clock.now += self.seconds


def fit(monitor=None, steps=5, logger=None, model=None, data=None, callbacks=(), **kwargs):
    """Train a tiny run; ``model`` may be a module or a zero-argument factory (built after
    seeding); ``callbacks`` run before the monitor. Returns ``(trainer, model, logger)``."""
    torch.manual_seed(0)
    model = model() if callable(model) and not isinstance(model, nn.Module) else model
    model = model if model is not None else TinyClassifier()
    logger = logger if logger is not None else SpyLogger()
    callbacks = [*callbacks, *([monitor] if monitor is not None else [])]
    trainer = pl.Trainer(
        max_steps=steps, logger=logger, callbacks=callbacks, **trainer_kwargs(**kwargs)
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
        trainer.fit(model, data if data is not None else loader())
    return trainer, model, logger
