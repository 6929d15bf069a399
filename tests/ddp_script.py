"""Two-process DDP run (gloo, CPU) with FisherMonitor; run by tests/test_ddp.py.

Usage: python ddp_script.py OUT_DIR STRUCTURE[,STRUCTURE...]

Rank r saves its training batch of each step (batch_{r}_{step}.pt); rank 0 saves the weights
at each step (weights_{step}.pt) and the monitor's logged metrics (metrics_{step}.pt).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))

from lightning_helpers import SpyLogger, TinyClassifier, loader  # noqa: E402

from fisher_monitor import FisherMonitor  # noqa: E402


class Recorder(pl.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        torch.save(batch, self.out / f"batch_{trainer.global_rank}_{step}.pt")
        if trainer.global_rank == 0:
            torch.save(pl_module.net.state_dict(), self.out / f"weights_{step}.pt")


class FileLogger(SpyLogger):
    def __init__(self, out: Path):
        super().__init__()
        self.out = out

    def log_metrics(self, metrics, step=None):
        super().log_metrics(metrics, step)
        if any(key.startswith("fisher/") for key in metrics):
            torch.save(metrics, self.out / f"metrics_{step}.pt")


def main() -> None:
    out = Path(sys.argv[1])
    structures = tuple(sys.argv[2].split(","))
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = TinyClassifier()
    # the recorder runs first, so it saves the weights the monitor measures
    callbacks = [
        Recorder(out),
        FisherMonitor(every_n_steps=1, structures=structures, network="net"),
    ]
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_steps=3,
        logger=FileLogger(out),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # 64 samples over 2 processes, batches of 12: steps 0-2 see 12, 12 and 8 samples each
    trainer.fit(model, loader(n=64, batch_size=12, shuffle=True))


if __name__ == "__main__":
    main()
