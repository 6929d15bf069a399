"""``hessian_product``: the loss-Hessian applied in output space, against autograd's Hessian."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

from fisher_monitor.likelihoods import SketchedLikelihood
from likelihood_cases import CASES, likelihood_case, per_sample_derivatives


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("name", "shape"), CASES)
def test_hessian_product_is_the_per_sample_hessian(name, shape, reduction):
    generator = torch.Generator().manual_seed(7)
    likelihood, loss_fn, outputs, targets = likelihood_case(name, reduction, shape, generator)
    _, hessians = per_sample_derivatives(loss_fn, outputs, targets)
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
    likelihood, _, outputs, _ = likelihood_case("cross_entropy", "mean", (4, 5, 3), generator)
    vectors = torch.randn(6, *outputs.shape, generator=generator, dtype=torch.float64)
    batched = vmap(lambda v: likelihood.hessian_product(outputs, v))(vectors)
    looped = torch.stack([likelihood.hessian_product(outputs, v) for v in vectors])
    assert torch.allclose(batched, looped, atol=1e-14)
