"""Sketched columns of the exact Fisher: ``k`` random combinations of the loss-Hessian's root.

The exact Fisher's factor has ``R_n`` columns per sample, ``J_nᵀ S_n`` with
``S_n S_nᵀ = H_n`` the loss-Hessian (``R_n = (C − 1)·T`` for a cross-entropy over ``C``
classes and ``T`` positions). A *sketch* replaces them by ``k`` columns

    J_nᵀ s_{n,j} / √k,    s_{n,j} = S_n w_{n,j},    j = 1 … k,

with independent Rademacher vectors ``w`` (entries ±1, ``E[wwᵀ] = I``), so that
``E[s sᵀ] = H_n`` and the sketched factor ``V̂`` gives an unbiased estimate
``E[V̂V̂ᵀ] = F`` whatever ``C`` and ``T`` are. The loss side is formed without ever building
``S_n`` (which is ``C × (C − 1)`` per position): for a softmax, with ``τ = √p``,
``S = diag(τ) Q`` and ``QQᵀ = I − ττᵀ``, so a Rademacher vector ``w`` in the ``C`` class
coordinates gives

    s = τ ⊙ (w − τ (τᵀw)),      E[ssᵀ] = diag(τ)(I − ττᵀ) diag(τ) = diag(p) − ppᵀ,

in ``O(C)`` per position (independent ``w`` per position: ``H_n`` is block-diagonal over
positions). For a Gaussian ``s = √c w`` and for a Bernoulli ``s = √(σ(1 − σ)) w``. Among
vectors with independent, zero-mean, unit-variance entries, Rademacher vectors give the
smallest variance of every ``(aᵀs)²``: ``E[(bᵀw)⁴] = 3‖b‖⁴ + (E[w⁴] − 3) Σ b_i⁴`` and
``E[w⁴] = 1`` is the smallest fourth moment possible.

The columns travel through the backends like Monte-Carlo labels (the observed residual
rides along as one extra column, so the per-sample gradients and the EF stay exact); only
the loss side differs. See ``docs/theory.md#estimators``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fisher_monitor.likelihoods.base import LOSS_SIDE_DTYPE, Likelihood


class SketchedLikelihood(Likelihood):
    """A likelihood whose "sampled residuals" are Rademacher sketches of ``S_n``.

    Everything except :meth:`draw_noise` and :meth:`sampled_residuals` is the wrapped
    likelihood's: the backends' Monte-Carlo path (``exact=False``) then backpropagates
    ``k`` sketched columns of the exact Fisher plus the observed residual.

    Args:
        base: The likelihood of the loss.
    """

    module_class = nn.Module  # replaced per instance by the wrapped likelihood's
    name = "sketched"

    def __init__(self, base: Likelihood):
        super().__init__(base.reduction)
        self.base = base
        self.module_class = base.module_class  # type: ignore[misc]
        self.name = base.name  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"SketchedLikelihood({self.base!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SketchedLikelihood) and other.base == self.base

    def __hash__(self) -> int:
        return hash((SketchedLikelihood, self.base))

    def make_module(self) -> nn.Module:  # noqa: D102
        return self.base.make_module()

    def options(self) -> dict[str, Any]:  # noqa: D102
        return self.base.options()

    def check_batch(self, outputs: Tensor, targets: Tensor) -> None:  # noqa: D102
        self.base.check_batch(outputs, targets)

    def output_mask(self, targets: Tensor, sample_shape: Sequence[int]) -> Tensor | None:  # noqa: D102
        return self.base.output_mask(targets, sample_shape)

    def fisher_columns(self, sample_shape: Sequence[int]) -> int:  # noqa: D102
        return self.base.fisher_columns(sample_shape)

    def residuals(self, outputs: Tensor, targets: Tensor) -> Tensor:  # noqa: D102
        return self.base.residuals(outputs, targets)

    def sqrt_hessian(self, outputs: Tensor) -> Tensor:  # noqa: D102
        return self.base.sqrt_hessian(outputs)

    def coefficients(self, outputs: Tensor, targets: Tensor) -> Tensor:  # noqa: D102
        return self.base.coefficients(outputs, targets)

    def draw_noise(self, outputs: Tensor, samples: int) -> Tensor:
        """Rademacher signs of the base likelihood's :meth:`~Likelihood.sketch_sign_shape`."""
        return rademacher(self.base.sketch_sign_shape(outputs, samples), outputs.device)

    def sampled_residuals(self, outputs: Tensor, noise: Tensor) -> Tensor:
        """``S_n w_{n,j} / √k`` per sample, shaped ``(N, K, k)`` like sampled residuals."""
        return self.base.sketch_columns(outputs, noise)

    def hessian_product(self, outputs: Tensor, vectors: Tensor) -> Tensor:  # noqa: D102
        return self.base.hessian_product(outputs, vectors)


def rademacher(shape: Sequence[int], device=None) -> Tensor:
    """Independent ±1 signs (float64) from the global RNG, eight from each random byte.

    Drawing bytes and unpacking their bits is about ten times faster than drawing one
    Bernoulli variable per sign, which matters when ``N·k·C`` reaches millions.
    """
    count = 1
    for size in shape:
        count *= int(size)
    random_bytes = torch.randint(0, 256, ((count + 7) // 8,), dtype=torch.uint8, device=device)
    shifts = torch.arange(8, dtype=torch.uint8, device=device)
    bits = (random_bytes.unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:count].reshape(tuple(shape)).to(LOSS_SIDE_DTYPE).mul_(2.0).sub_(1.0)


__all__ = ["SketchedLikelihood", "rademacher"]
