"""Two-process DDP run (gloo, CPU) with FisherMonitor; run by tests/test_ddp.py.

Usage: python ddp_script.py OUT_DIR STRUCTURE[,STRUCTURE...] [every|budget|fail]

Rank r saves its training batch of each step (batch_{r}_{step}.pt) and the steps its
monitor measured (steps_{r}.pt); rank 0 saves the weights at each step (weights_{step}.pt),
the monitor's logged metrics (metrics_{step}.pt) and its warnings (warnings.txt). Mode
``budget`` uses the time-budget schedule (decided on rank 0, broadcast), ``fail`` gives
process 1 a probe batch of NaN so that its measurements fail and rank 0 must say why.

The process group is destroyed and the process leaves with ``os._exit`` once everything is
written: with gloo, torch 2.14 could abort at interpreter exit ("terminate called without
an active exception", exit code -6) while its threads were torn down.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from fisher_monitor import FisherMonitor, schedules  # noqa: E402
from lightning_helpers import SpyLogger, TinyClassifier, loader  # noqa: E402


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
        if any(key.startswith("~fisher/probe/") for key in metrics):
            torch.save(metrics, self.out / f"metrics_{step}.pt")


def nan_on_process_1(batch):
    inputs, targets = batch
    if dist.get_rank() == 1:
        inputs = torch.full_like(inputs, float("nan"))
    return inputs, targets


def monitor_for(structures: tuple[str, ...], mode: str) -> FisherMonitor:
    if mode == "budget":
        return FisherMonitor(schedule=schedules.budget(0.5), structures=structures, network="net")
    if mode == "fail":
        return FisherMonitor(
            every_n_steps=1,
            structures=structures,
            network="net",
            batch_to_inputs_targets=nan_on_process_1,
        )
    return FisherMonitor(every_n_steps=1, structures=structures, network="net")


def main() -> None:
    out = Path(sys.argv[1])
    structures = tuple(sys.argv[2].split(","))
    mode = sys.argv[3] if len(sys.argv) > 3 else "every"
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = TinyClassifier()
    monitor = monitor_for(structures, mode)
    # the recorder runs first, so it saves the weights the monitor measures
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_steps=3 if mode != "budget" else 12,
        logger=FileLogger(out),
        callbacks=[Recorder(out), monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # 64 samples over 2 processes, batches of 12: steps 0-2 see 12, 12 and 8 samples each
        trainer.fit(model, loader(n=64, batch_size=12, shuffle=True))
    rank = trainer.global_rank
    torch.save(monitor._history.steps, out / f"steps_{rank}.pt")
    if rank == 0:
        messages = [str(w.message) for w in caught if "FisherMonitor" in str(w.message)]
        (out / "warnings.txt").write_text("\n".join(messages))
    if dist.is_initialized():
        dist.barrier()  # every file of every process is written
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
