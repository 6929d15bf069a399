"""Quickstart: add FisherMonitor to a Lightning run, then turn its logs into a report.

An MLP learns scikit-learn's bundled 8×8 digits; the callback compares the empirical
Fisher with the Fisher (diagonal, per-layer blocks, Kronecker factors) at log-spaced steps
and logs to TensorBoard. Afterwards ``fisher_monitor.report`` writes the HTML report.

    python examples/quickstart.py           # ~15 s
    python examples/quickstart.py --demo    # what `make demo` runs: about a minute
    python examples/quickstart.py --fast    # a few seconds (tests)

At the end it prints the commands that open the dashboard and rebuild the report, with
the full path of the executables of the Python that runs it (``.venv/bin/tensorboard``
under ``make demo``), so that they run as printed without activating the environment.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DigitsClassifier, digits, fast_mode, loaders, quiet  # noqa: E402

from fisher_monitor import FisherMonitor, schedules  # noqa: E402
from fisher_monitor.report import load_runs, verdicts, write_report  # noqa: E402
from fisher_monitor.shell import report_command, shown, tensorboard_command  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main(fast: bool = False, demo: bool = False, root: Path | None = None) -> dict:
    """Train, monitor, report. Returns the paths written and the headline numbers."""
    quiet()
    torch.manual_seed(0)
    root = Path(root) if root else ROOT / "runs"
    epochs = 2 if fast else (100 if demo else 15)
    train, val = digits()
    train_loader, val_loader = loaders(train, val)
    monitor = FisherMonitor(
        # dense early, sparse later; never more than 40 steps apart
        schedule=schedules.log_spaced(per_decade=10, max_interval=20),
        structures=("diag", "block", "kron"),
        prog_bar="block/direction_cosine/all",
    )
    logger = TensorBoardLogger(root, name="quickstart")
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=logger,
        callbacks=[monitor],
        accelerator="cpu",
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not fast,
        log_every_n_steps=10,
    )
    trainer.fit(DigitsClassifier(), train_loader, val_loader)
    log_dir = Path(logger.log_dir)
    (run,) = load_runs([log_dir])
    written = write_report([run], log_dir / "report", title="fisher-monitor demo: MLP on digits")
    headline = verdicts(run)[0]
    accuracy = float(trainer.callback_metrics.get("val/accuracy", torch.tensor(float("nan"))))
    shell = {
        "tensorboard": tensorboard_command(root),
        "report": report_command(log_dir, "-o", log_dir / "report"),
    }
    print()
    print(f"TensorBoard run:  {shown(log_dir)}")
    print(f"  open it with:   {shell['tensorboard']}" + ("   (or: make tensorboard)" * demo))
    print(f"HTML report:      {shown(written['html'])}")
    print(f"  rebuild it:     {shell['report']}" + ("   (or: make report)" * demo))
    print(
        f"Validation accuracy {accuracy:.3f} after {trainer.global_step} steps, "
        f"{len(run.steps)} measurements."
    )
    print(f"Verdict: {headline.text}")
    return {
        "log_dir": log_dir,
        "report": written["html"],
        "commands": shell,
        "measurements": len(run.steps),
        "verdict": headline,
        "accuracy": accuracy,
        "final_direction_cosine": run.scalars["block/direction_cosine/all"][-1][1],
    }


if __name__ == "__main__":
    main(fast=fast_mode(), demo="--demo" in sys.argv)
