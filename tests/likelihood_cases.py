"""Loss cases shared by the likelihood tests, with autograd's per-sample derivatives."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import grad, hessian, vmap

from fisher_monitor.likelihoods import Bernoulli, Categorical, Gaussian, Likelihood
from reference import sample_nll

#: ``(likelihood name, output shape)``: every likelihood, with positions and pixels.
CASES = [
    ("cross_entropy", (6, 4)),
    ("cross_entropy", (6, 4, 3)),  # a sequence: C = 4 classes at T = 3 positions
    ("cross_entropy", (5, 3, 2, 2)),  # per-pixel classes
    ("mse", (6, 3)),
    ("mse", (6, 2, 3)),
    ("mse", (6,)),
    ("bce", (6,)),
    ("bce", (6, 1)),
]


def likelihood_case(
    name: str, reduction: str, shape, generator: torch.Generator
) -> tuple[Likelihood, nn.Module, Tensor, Tensor]:
    """The likelihood, its loss module, float64 outputs of ``shape`` and matching targets."""
    outputs = 3 * torch.randn(*shape, generator=generator, dtype=torch.float64)
    if name == "cross_entropy":
        targets = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=generator)
        return Categorical(reduction), nn.CrossEntropyLoss(reduction=reduction), outputs, targets
    if name == "mse":
        targets = torch.randn(*shape, generator=generator, dtype=torch.float64)
        return Gaussian(reduction), nn.MSELoss(reduction=reduction), outputs, targets
    targets = torch.randint(0, 2, shape, generator=generator).to(torch.float64)
    return Bernoulli(reduction), nn.BCEWithLogitsLoss(reduction=reduction), outputs, targets


def per_sample_derivatives(loss_fn: nn.Module, outputs: Tensor, targets: Tensor):
    """``∇_f ℓ_n`` ``(N, K)`` and ``∇²_f ℓ_n`` ``(N, K, K)`` by autograd on the per-sample NLL."""
    nll = sample_nll(loss_fn)
    n, shape = outputs.shape[0], outputs.shape[1:]

    def sample(f, y):
        return nll(f.reshape(1, *shape), y.unsqueeze(0))

    flat = outputs.reshape(n, -1)
    return vmap(grad(sample))(flat, targets), vmap(hessian(sample))(flat, targets)
