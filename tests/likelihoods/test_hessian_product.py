"""``hessian_product``: the loss-Hessian applied in output space, against autograd's Hessian."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import hessian, vmap

from fisher_monitor.likelihoods import Bernoulli, Categorical, Gaussian, SketchedLikelihood
from reference import sample_nll

CASES = [
    ("cross_entropy", (6, 4)),
    ("cross_entropy", (6, 4, 3)),  # C = 4 classes at T = 3 positions
    ("cross_entropy", (5, 3, 2, 2)),  # per-pixel classes
    ("mse", (6, 3)),
    ("mse", (6, 2, 3)),
    ("mse", (6,)),
    ("bce", (6,)),
    ("bce", (6, 1)),
]


def _case(name: str, reduction: str, shape, generator):
    outputs = 3 * torch.randn(*shape, generator=generator, dtype=torch.float64)
    if name == "cross_entropy":
        targets = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=generator)
        return Categorical(reduction), nn.CrossEntropyLoss(reduction=reduction), outputs, targets
    if name == "mse":
        targets = torch.randn(*shape, generator=generator, dtype=torch.float64)
        return Gaussian(reduction), nn.MSELoss(reduction=reduction), outputs, targets
    targets = torch.randint(0, 2, shape, generator=generator).to(torch.float64)
    return Bernoulli(reduction), nn.BCEWithLogitsLoss(reduction=reduction), outputs, targets


def _hessians(loss_fn, outputs, targets):
    """``∇²_f ℓ_n`` per sample, ``(N, K, K)``, by autograd on the per-sample NLL."""
    nll = sample_nll(loss_fn)
    n, shape = outputs.shape[0], outputs.shape[1:]

    def sample(f, y):
        return nll(f.reshape(1, *shape), y.unsqueeze(0))

    return vmap(hessian(sample))(outputs.reshape(n, -1), targets)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("name", "shape"), CASES)
def test_hessian_product_is_the_per_sample_hessian(name, shape, reduction):
    generator = torch.Generator().manual_seed(7)
    likelihood, loss_fn, outputs, targets = _case(name, reduction, shape, generator)
    hessians = _hessians(loss_fn, outputs, targets)
    vectors = torch.randn(*outputs.shape, generator=generator, dtype=torch.float64)
    expected = torch.einsum("nkl,nl->nk", hessians, vectors.reshape(outputs.shape[0], -1))
    found = likelihood.hessian_product(outputs, vectors)
    assert found.shape == outputs.shape
    assert torch.allclose(found.reshape(outputs.shape[0], -1), expected, atol=1e-12)
    # the default (through S_n) and the sketch's wrapper agree with the closed forms
    default = type(likelihood).__mro__[1].hessian_product(likelihood, outputs, vectors)
    assert torch.allclose(default, found, atol=1e-12)
    assert torch.equal(SketchedLikelihood(likelihood).hessian_product(outputs, vectors), found)


def test_hessian_product_batches_under_vmap():
    """Batched vectors against unbatched outputs, as the matrix-free products call it."""
    generator = torch.Generator().manual_seed(3)
    likelihood, _, outputs, _ = _case("cross_entropy", "mean", (4, 5, 3), generator)
    vectors = torch.randn(6, *outputs.shape, generator=generator, dtype=torch.float64)
    batched = vmap(lambda v: likelihood.hessian_product(outputs, v))(vectors)
    looped = torch.stack([likelihood.hessian_product(outputs, v) for v in vectors])
    assert torch.allclose(batched, looped, atol=1e-14)
