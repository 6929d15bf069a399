"""Sketched columns of the exact Fisher: ``k`` random combinations of the Hessian's square root.

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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from fisher_monitor.likelihoods import LOSS_SIDE_DTYPE, Likelihood
from fisher_monitor.likelihoods.bernoulli import Bernoulli
from fisher_monitor.likelihoods.categorical import Categorical
from fisher_monitor.likelihoods.gaussian import Gaussian


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

    def check_batch(self, outputs: Tensor, targets: Tensor) -> None:  # noqa: D102
        self.base.check_batch(outputs, targets)

    def fisher_columns(self, sample_shape: Sequence[int]) -> int:  # noqa: D102
        return self.base.fisher_columns(sample_shape)

    def residuals(self, outputs: Tensor, targets: Tensor) -> Tensor:  # noqa: D102
        return self.base.residuals(outputs, targets)

    def sqrt_hessian(self, outputs: Tensor) -> Tensor:  # noqa: D102
        return self.base.sqrt_hessian(outputs)

    def coefficients(self, outputs: Tensor, targets: Tensor) -> Tensor:  # noqa: D102
        return self.base.coefficients(outputs, targets)

    def draw_noise(self, outputs: Tensor, samples: int) -> Tensor:
        """Rademacher signs ``(N, k, *sample_shape)`` (``(N, k, R_n)`` for other likelihoods)."""
        if isinstance(self.base, (Categorical, Gaussian, Bernoulli)):
            shape = (outputs.shape[0], samples, *outputs.shape[1:])
        else:
            shape = (outputs.shape[0], samples, self.base.fisher_columns(outputs.shape[1:]))
        return rademacher(shape, outputs.device)

    def sampled_residuals(self, outputs: Tensor, noise: Tensor) -> Tensor:
        """``S_n w_{n,j} / √k`` per sample, shaped ``(N, K, k)`` like sampled residuals."""
        return sketch_columns(self.base, outputs, noise)


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


def sketch_columns(likelihood: Likelihood, outputs: Tensor, noise: Tensor) -> Tensor:
    """``S_n w_{n,j}/√k`` for Rademacher ``w`` (see the module docstring), ``(N, K, k)``.

    Args:
        likelihood: The likelihood whose loss-Hessian is sketched.
        outputs: ``(N, *sample_shape)`` network outputs (float64).
        noise: ``(N, k, *sample_shape)`` signs, or ``(N, k, R_n)`` for a likelihood without a
            closed-form sketch (then ``S_n`` is formed by :meth:`Likelihood.sqrt_hessian`).

    Returns:
        The sketched loss-side columns.
    """
    n, k = noise.shape[:2]
    scale = k**-0.5
    if isinstance(likelihood, Categorical):
        log_probs = outputs.log_softmax(dim=1).unsqueeze(1)  # (N, 1, C, ...)
        # τ ⊙ (w − τ(τᵀw))/√k = t − p (Σ_c t_c) with t = τ ⊙ w/√k: three passes over N·k·C
        columns = (0.5 * log_probs).exp().mul_(scale) * noise
        projection = columns.sum(dim=2, keepdim=True)
        columns.addcmul_(log_probs.exp(), projection, value=-1.0)
    elif isinstance(likelihood, Gaussian):
        columns = (scale * likelihood.curvature(outputs) ** 0.5) * noise
    elif isinstance(likelihood, Bernoulli):
        logits = outputs.unsqueeze(1)
        root = torch.nn.functional.logsigmoid(logits) + torch.nn.functional.logsigmoid(-logits)
        columns = (0.5 * root).exp().mul_(scale) * noise
    else:
        roots = likelihood.sqrt_hessian(outputs)  # (N, K, R_n)
        return torch.einsum("nkr,njr->nkj", roots, noise) * scale
    return columns.reshape(n, k, -1).transpose(1, 2)


@contextmanager
def sketching(prepared) -> Iterator[None]:
    """Let a prepared backend's Monte-Carlo pass backpropagate sketched exact columns.

    Args:
        prepared: A :class:`~fisher_monitor.curvature.backends.Backend`; its likelihood
            is wrapped in :class:`SketchedLikelihood` for the duration of the block.
    """
    original = prepared.likelihood
    prepared.likelihood = SketchedLikelihood(original)
    try:
        yield
    finally:
        prepared.likelihood = original


__all__ = ["SketchedLikelihood", "rademacher", "sketch_columns", "sketching"]
