"""Diagonal, block and Kronecker structures side by side on a small CNN.

A CNN (two convolutions, two linear layers) learns scikit-learn's 8×8 digits under
``FisherMonitor(structures=("diag", "block", "kron"))``. For each layer and structure S the
script reads the logs back (``fisher_monitor.report.load_runs``) and compares how well the
EF restricted to S tracks the Fisher restricted to S: the relative error ‖EF_S − F_S‖/‖F_S‖
and the direction cosine cos(F̃_S⁻¹g, ẼF_S⁻¹g), medians over the measurements.

Reading the numbers: ``diag`` and ``block`` restrict *both* matrices, so their errors
measure the EF's own mismatch at that resolution; ``kron`` compares the exact EF block with
a Kronecker-factored Fisher (KFC for the convolutions), so its error adds the factorisation
error to the EF's. A preconditioner built on the EF inherits whichever of these a user
picks.

    python examples/cnn_block_kron.py [--fast]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DigitsClassifier, digits, fast_mode, loaders, output_dir, quiet  # noqa: E402

from fisher_monitor import FisherMonitor  # noqa: E402
from fisher_monitor.report import load_runs  # noqa: E402

STRUCTURES = ("diag", "block", "kron")


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def main(fast: bool = False) -> dict:
    quiet()
    torch.manual_seed(0)
    train, val = digits(image=True)
    train_loader, val_loader = loaders(train, val)
    out = output_dir("cnn_block_kron")
    logger = TensorBoardLogger(out / "runs", name="cnn")
    trainer = pl.Trainer(
        max_epochs=1 if fast else 12,
        logger=logger,
        callbacks=[FisherMonitor(every_n_steps=8 if fast else 25, structures=STRUCTURES)],
        accelerator="cpu",
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(DigitsClassifier(net=cnn()), train_loader, val_loader)
    (run,) = load_runs([logger.log_dir])
    layers = run.layers
    table: dict[str, dict[str, dict[str, float]]] = {}
    for structure in STRUCTURES:
        for layer in [*layers, "all"]:
            entry = table.setdefault(layer, {}).setdefault(structure, {})
            for metric in ("rel_error", "direction_cosine"):
                values = run.series(run.key(metric, layer, structure=structure))[1]
                entry[metric] = float(np.median(values)) if len(values) else float("nan")

    figure = Figure(figsize=(12, 4), dpi=100, layout="constrained")
    axes = figure.subplots(1, 2)
    positions = np.arange(len(layers) + 1)
    for ax, metric, title in zip(
        axes,
        ("rel_error", "direction_cosine"),
        ("median ‖EF_S − F_S‖ / ‖F_S‖", "median cos(F̃_S⁻¹g, ẼF_S⁻¹g)"),
        strict=True,
    ):
        for k, structure in enumerate(STRUCTURES):
            values = [table[layer][structure][metric] for layer in [*layers, "all"]]
            ax.bar(positions + (k - 1) * 0.27, values, width=0.27, label=structure)
        ax.set_xticks(positions, labels=[*layers, "all"], rotation=20)
        ax.set_title(title)
    axes[0].set_yscale("log")
    axes[0].legend()
    figure.suptitle(f"CNN on digits, {len(run.steps)} measurements")
    figure_path = out / "cnn_block_kron.png"
    FigureCanvasAgg(figure).print_png(figure_path)

    print(f"figure: {figure_path}; TensorBoard logs: {logger.log_dir}")
    print(
        f"{'layer':>8} | " + " | ".join(f"{s:>17}" for s in STRUCTURES) + "   (rel. error / cosine)"
    )
    for layer in [*layers, "all"]:
        cells = [
            f"{table[layer][s]['rel_error']:8.3f} / {table[layer][s]['direction_cosine']:6.3f}"
            for s in STRUCTURES
        ]
        print(f"{layer:>8} | " + " | ".join(cells))
    return {"table": table, "layers": layers, "measurements": len(run.steps)}


if __name__ == "__main__":
    main(fast=fast_mode())
