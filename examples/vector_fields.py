"""Figure 1 of Kunstner, Balles & Hennig (2019) on fisher-monitor's ``measure()``.

Linear regression with two parameters: N = 1000 inputs x ~ LogNormal(0, 0.75), targets
y = 2 + 2x + ε with ε ~ N(0, 1), features φ = [1, x], model f = θᵀφ and
``MSELoss(reduction="mean")``. On a grid of θ, ``measure(..., keep_blocks=True)`` returns
the mean gradient g, the Fisher F and the empirical Fisher EF of the model; the script
draws the gradient field −g, the natural-gradient field −F̃⁻¹g and the EF-preconditioned
field −ẼF⁻¹g side by side, integrates a few trajectories of each, and prints the direction
cosine cos(F̃⁻¹g, ẼF⁻¹g) that fisher-monitor logs at the trajectories' start points.

What to look for: the natural gradient points straight at the optimum from everywhere (for
linear regression F is the Hessian up to a constant), the gradient field is skewed by the
poor conditioning of ΦᵀΦ, and the EF field bends away, most strongly far from the
optimum where the residuals r_n in EF = 4 Σ r_n² φ_n φ_nᵀ / N are large and uneven.

Differences from the paper: the paper draws the fields for a loss ½ Σ (y − θᵀφ)² and picks
its own grid and start points; with ``MSELoss`` (variance ½, the noise has variance 1)
EF and F differ by a factor 2σ² = 2 even at the optimum, which scales the EF arrows but
not their directions, so the qualitative picture is the same.

    python examples/vector_fields.py [--fast]
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

DAMPING = 1e-8  # absolute: the 2 × 2 matrices are well conditioned away from the optimum


def make_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.exp(0.75 * torch.randn(n, generator=generator, dtype=torch.float64))
    y = 2.0 + 2.0 * x + torch.randn(n, generator=generator, dtype=torch.float64)
    features = torch.stack([torch.ones_like(x), x], dim=1)
    return features, y.unsqueeze(1)


def curvature(theta: np.ndarray, features, targets):
    """g, F, EF and the logged direction cosine at θ, from fisher-monitor."""
    m = measure(
        linear_model(theta, bias=False),
        nn.MSELoss(),
        features,
        targets,
        structures=("block",),
        damping=DAMPING,
        damping_mode="absolute",
        keep_blocks=True,
    )
    fisher, empirical, gradient = (t.numpy() for t in m.blocks["(root)"])
    return gradient, fisher, empirical, m["block/direction_cosine/all"]


def directions(theta, features, targets):
    g, fisher, empirical, cosine = curvature(theta, features, targets)
    eye = np.eye(2) * DAMPING
    return {
        "gradient descent": -g,
        "natural gradient": -np.linalg.solve(fisher + eye, g),
        "EF-preconditioned": -np.linalg.solve(empirical + eye, g),
    }, cosine


def integrate(start, method, features, targets, steps, length):
    """Follow the normalised field of one method (Euler steps of ``length / steps``).

    The step is halved whenever the direction turns back, so a path settles at a fixed
    point instead of oscillating around it.
    """
    path = [np.asarray(start, dtype=float)]
    size = length / steps
    previous = None
    for _ in range(steps):
        field, _ = directions(path[-1], features, targets)
        d = field[method]
        norm = np.linalg.norm(d)
        if norm < 1e-12:
            break
        d = d / norm
        if previous is not None and d @ previous < 0:
            size /= 2
        previous = d
        path.append(path[-1] + size * d)
    return np.array(path)


def main(fast: bool = False) -> dict:
    quiet()
    features, targets = make_data(200 if fast else 1000)
    optimum = torch.linalg.lstsq(features, targets).solution.squeeze(1).numpy()
    grid_size = 7 if fast else 15
    span = np.linspace(-2.0, 6.0, grid_size)
    starts = [np.array(p) for p in ([-1.0, 5.0], [5.0, -1.0], [-1.5, -1.5], [5.5, 5.5])]
    methods = ("gradient descent", "natural gradient", "EF-preconditioned")

    figure = Figure(figsize=(15, 5), dpi=100, layout="constrained")
    axes = figure.subplots(1, 3)
    fields = {m: np.zeros((grid_size, grid_size, 2)) for m in methods}
    for i, b in enumerate(span):
        for j, a in enumerate(span):
            field, _ = directions(np.array([a, b]), features, targets)
            for method in methods:
                fields[method][i, j] = field[method] / (np.linalg.norm(field[method]) + 1e-300)
    trajectories = {}
    for ax, method in zip(axes, methods, strict=True):
        ax.quiver(
            span,
            span,
            fields[method][..., 0],
            fields[method][..., 1],
            color="0.5",
            angles="xy",
            width=0.004,
        )
        for start in starts:
            path = integrate(start, method, features, targets, steps=20 if fast else 80, length=9.0)
            trajectories.setdefault(method, []).append(path)
            ax.plot(path[:, 0], path[:, 1], linewidth=2)
            ax.plot(*start, "o", color="black", markersize=4)
        ax.plot(*optimum, "*", color="red", markersize=14)
        ax.set_title(method)
        ax.set_xlabel("θ₀ (intercept)")
        ax.set_xlim(span[0], span[-1])
        ax.set_ylim(span[0], span[-1])
    axes[0].set_ylabel("θ₁ (slope)")
    figure.suptitle("Linear regression: gradient, natural gradient and EF-preconditioned fields")
    out = output_dir("vector_fields") / "vector_fields.png"
    FigureCanvasAgg(figure).print_png(out)

    cosines = [directions(start, features, targets)[1] for start in starts]
    final_distance = {
        method: float(np.mean([np.linalg.norm(p[-1] - optimum) for p in paths]))
        for method, paths in trajectories.items()
    }
    print(f"optimum θ* = {optimum.round(3)}; figure: {out}")
    print("direction cosine cos(F̃⁻¹g, ẼF⁻¹g) at the start points:")
    for start, cosine in zip(starts, cosines, strict=True):
        print(f"  θ = {start}: {cosine:.3f}")
    print("mean distance to θ* after a path of length 9:")
    for method, distance in final_distance.items():
        print(f"  {method:>18}: {distance:.3f}")
    return {"optimum": optimum, "cosines": cosines, "final_distance": final_distance, "figure": out}


if __name__ == "__main__":
    main(fast=fast_mode())
