"""Figure 2 of Kunstner, Balles & Hennig (2019): EF ≈ F only for a right model *and* large N.

Logistic regression (``Linear(2, 1)`` + ``BCEWithLogitsLoss``) on three data sets of two
Gaussian classes with equal priors:

- *well specified*: the classes share their covariance, so the true log-odds are linear
  in x and the model can be right;
- *misspecified: variances*: class variances differ (quadratic log-odds);
- *misspecified: crossed*: class 0 is narrow along x₁ and wide along x₂, class 1 the
  other way round; the EF overstates some directions and understates others.

For growing N the model is fitted to its optimum θ* with Newton's method, using the Fisher
that ``measure(..., keep_blocks=True)`` returns (for logistic regression the Fisher *is*
the Hessian). At θ* fisher-monitor then reports the relative error ‖EF − F‖/‖F‖, the KL
divergence between the two Laplace approximations and tr EF / tr F (whole model, one
block). The gradient vanishes at θ*, so the direction cosine cos(F̃⁻¹g, ẼF⁻¹g) is taken
halfway along the path from 0 to θ*, with F and EF evaluated there.

Expected picture: the relative error and the KL of the well-specified data shrink as N
grows (EF → F), those of the misspecified data level off at a positive value. On the
crossed data the trace ratio stays near 1 while the matrices differ by about half their
size: the trace alone misses that mismatch.

Differences from the paper: the paper plots Laplace contours of a 2-parameter model at the
optimum for a few N; here the same comparison is summarised by fisher-monitor's metrics over
a range of N (means over seeds), and the model has an intercept (3 parameters).

    python examples/misspecification.py [--fast]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fast_mode, linear_model, output_dir, quiet  # noqa: E402

from fisher_monitor import measure  # noqa: E402

DATASETS = ("well specified", "misspecified: variances", "misspecified: crossed")
METRICS = ("rel_error", "kl", "trace_ratio", "direction_cosine")


def sample(dataset: str, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes with equal priors; returns inputs (n, 2) and float labels (n, 1)."""
    labels = torch.randint(0, 2, (n,), generator=generator)
    z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    if dataset == "well specified":
        means = torch.tensor([[-1.0, -0.5], [1.0, 0.5]], dtype=torch.float64)
        shared = torch.tensor([[1.0, 0.6], [0.0, 0.8]], dtype=torch.float64)
        x = z @ shared.T + means[labels]
    elif dataset == "misspecified: variances":
        means = torch.tensor([[-1.0, -0.5], [1.0, 0.5]], dtype=torch.float64)
        scales = torch.tensor([[0.4, 0.4], [2.0, 1.0]], dtype=torch.float64)
        x = z * scales[labels] + means[labels]
    else:
        means = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
        scales = torch.tensor([[0.3, 1.0], [2.0, 0.3]], dtype=torch.float64)
        x = z * scales[labels] + means[labels]
    return x, labels.to(torch.float64).unsqueeze(1)


def block(theta, inputs, labels):
    m = measure(
        linear_model(theta),
        nn.BCEWithLogitsLoss(),
        inputs,
        labels,
        structures=("block",),
        damping=1e-6,
        keep_blocks=True,
    )
    return m, m.blocks["(root)"]


def fit(inputs, labels, iterations: int = 25) -> torch.Tensor:
    """Newton's method with the Fisher from fisher-monitor (= the Hessian here)."""
    theta = torch.zeros(3, dtype=torch.float64)
    for _ in range(iterations):
        _, (fisher, _, gradient) = block(theta, inputs, labels)
        step = torch.linalg.solve(fisher + 1e-10 * torch.eye(3, dtype=torch.float64), gradient)
        theta = theta - step
        if step.norm() < 1e-10 * (1 + theta.norm()):
            break
    return theta


def main(fast: bool = False) -> dict:
    quiet()
    sizes = [100, 1000, 10_000] if fast else [30, 100, 300, 1000, 3000, 10_000, 30_000]
    seeds = 2 if fast else 5
    results = {d: {m: np.zeros((len(sizes), seeds)) for m in METRICS} for d in DATASETS}
    for d, dataset in enumerate(DATASETS):
        for i, n in enumerate(sizes):
            for seed in range(seeds):
                generator = torch.Generator().manual_seed(1000 * d + 10 * i + seed)
                inputs, labels = sample(dataset, n, generator)
                optimum = fit(inputs, labels)
                at_optimum, _ = block(optimum, inputs, labels)
                halfway, _ = block(optimum / 2, inputs, labels)
                for metric in ("rel_error", "kl", "trace_ratio"):
                    results[dataset][metric][i, seed] = at_optimum[f"block/{metric}/all"]
                results[dataset]["direction_cosine"][i, seed] = halfway[
                    "block/direction_cosine/all"
                ]
    means = {d: {m: results[d][m].mean(axis=1) for m in METRICS} for d in DATASETS}

    figure = Figure(figsize=(14, 3.6), dpi=100, layout="constrained")
    axes = figure.subplots(1, 4)
    titles = {
        "rel_error": "‖EF − F‖ / ‖F‖ at θ*",
        "kl": "KL between Laplace approximations at θ*",
        "trace_ratio": "tr EF / tr F at θ*",
        "direction_cosine": "cos(F̃⁻¹g, ẼF⁻¹g) at θ*/2",
    }
    for ax, metric in zip(axes, METRICS, strict=True):
        for dataset in DATASETS:
            ax.plot(sizes, means[dataset][metric], marker="o", label=dataset)
        ax.set_xscale("log")
        if metric in ("rel_error", "kl"):
            ax.set_yscale("log")
        ax.set_xlabel("N")
        ax.set_title(titles[metric], fontsize="medium")
    axes[0].legend(fontsize="small")
    out = output_dir("misspecification") / "misspecification.png"
    FigureCanvasAgg(figure).print_png(out)

    print(f"figure: {out}")
    header = "".join(f"{n:>9}" for n in sizes)
    for metric in METRICS:
        print(f"\n{metric} (mean over {seeds} seeds)      N ={header}")
        for dataset in DATASETS:
            row = "".join(f"{v:9.3f}" for v in means[dataset][metric])
            print(f"  {dataset:>27}    {row}")
    return {"sizes": sizes, "means": means}


if __name__ == "__main__":
    main(fast=fast_mode())
