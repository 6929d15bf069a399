"""Shared test cases: tiny float64 models, probe batches and losses, seeded (curvlinops-style)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LossCase:
    name: str
    outputs: int

    def module(self, reduction: str) -> nn.Module:
        if self.name == "ce":
            return nn.CrossEntropyLoss(reduction=reduction)
        if self.name.startswith("mse"):
            return nn.MSELoss(reduction=reduction)
        return nn.BCEWithLogitsLoss(reduction=reduction)

    def targets(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.name == "ce":
            return torch.randint(0, self.outputs, (n,), generator=generator)
        if self.name.startswith("mse"):
            return torch.randn(n, self.outputs, generator=generator, dtype=torch.float64)
        return torch.randint(0, 2, (n, 1), generator=generator).to(torch.float64)


LOSS_CASES = {
    "ce": LossCase("ce", 3),
    "mse1": LossCase("mse1", 1),
    "mse3": LossCase("mse3", 3),
    "bce": LossCase("bce", 1),
}


def make_mlp(outputs: int) -> nn.Module:
    """Linear(4,5)-Tanh-Linear(5,4, no bias)-ReLU-Linear(4,C): D = 25 + 20 + 5C."""
    return nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4, bias=False), nn.ReLU(), nn.Linear(4, outputs)
    )


def make_cnn(outputs: int) -> nn.Module:
    """Conv(1→2, 3x3)-ReLU-Conv(2→2, 3x3, no bias)-Sigmoid-Flatten-Linear(8, C) on 1x6x6."""
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.ReLU(),
        nn.Conv2d(2, 2, 3, bias=False),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(8, outputs),
    )


MODELS = {"mlp": (make_mlp, (4,)), "cnn": (make_cnn, (1, 6, 6))}


def make_problem(model_name: str, loss_name: str, n: int = 6, seed: int = 0):
    """A float64 model, inputs, targets and loss case, all seeded."""
    generator = torch.Generator().manual_seed(seed)
    factory, shape = MODELS[model_name]
    case = LOSS_CASES[loss_name]
    torch.manual_seed(seed)
    model = factory(case.outputs).double()
    inputs = torch.randn(n, *shape, generator=generator, dtype=torch.float64)
    targets = case.targets(n, generator)
    return model, inputs, targets, case
