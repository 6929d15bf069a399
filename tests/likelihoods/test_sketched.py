"""The sketched likelihood: Rademacher combinations of the loss-Hessian's square root."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from fisher_monitor.likelihoods import SketchedLikelihood, resolve_loss


def _all_signs(count: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product((-1.0, 1.0), repeat=count)), dtype=torch.float64)


@pytest.mark.parametrize("loss", ["ce", "ce_positions", "mse", "bce"])
def test_sketch_averages_to_the_loss_hessian_exactly(loss):
    """Over all 2^K sign vectors, the mean of ``s sᵀ`` is ``H_n`` (no sampling involved)."""
    generator = torch.Generator().manual_seed(3)
    if loss == "ce":
        module, outputs = nn.CrossEntropyLoss(), torch.randn(2, 4, generator=generator)
    elif loss == "ce_positions":
        module, outputs = nn.CrossEntropyLoss(), torch.randn(2, 3, 2, generator=generator)
    elif loss == "mse":
        module, outputs = nn.MSELoss(), torch.randn(2, 3, generator=generator)
    else:
        module, outputs = nn.BCEWithLogitsLoss(), torch.randn(2, 1, generator=generator)
    outputs = outputs.double() * 3
    likelihood = resolve_loss(module)
    size = outputs[0].numel()
    signs = _all_signs(size)  # (2^K, K) in the output's flattened order
    noise = signs.reshape(1, -1, *outputs.shape[1:]).expand(
        outputs.shape[0], -1, *outputs.shape[1:]
    )
    columns = likelihood.sketch_columns(outputs, noise)  # (N, K, 2^K), carries 1/√(2^K)
    mean = columns @ columns.transpose(1, 2)
    roots = likelihood.sqrt_hessian(outputs)
    torch.testing.assert_close(mean, roots @ roots.transpose(1, 2), rtol=1e-12, atol=1e-14)


def test_sketched_likelihood_keeps_everything_else():
    base = resolve_loss(nn.CrossEntropyLoss(reduction="sum"))
    sketched = SketchedLikelihood(base)
    outputs = torch.randn(3, 4, dtype=torch.float64)
    targets = torch.tensor([0, 3, 1])
    torch.testing.assert_close(
        sketched.residuals(outputs, targets), base.residuals(outputs, targets)
    )
    assert sketched.fisher_columns((4, 5)) == base.fisher_columns((4, 5)) == 15
    assert sketched.loss_name == "CrossEntropyLoss"
    assert isinstance(sketched.make_module(), nn.CrossEntropyLoss)
    noise = sketched.draw_noise(outputs, 6)
    assert noise.shape == (3, 6, 4) and set(noise.unique().tolist()) == {-1.0, 1.0}
