"""``NLLLoss`` on log-probabilities: the categorical likelihood in log-probability coordinates.

The network ends in ``log_softmax`` (``nn.LogSoftmax``, or ``F.log_softmax`` in its
``forward``) and gives ``z = log p`` over ``C`` classes, ``(N, C, *positions)``, with
integer targets ``(N, *positions)``. A sample's negative log-likelihood is, as for
cross-entropy, the sum over its positions that are not ``ignore_index``:

    ℓ_n = −Σ_t z_{n, y_t, t}.

Per position, with ``p = exp z``:

- **Residual.** ``ℓ`` is linear in ``z``: ``r = ∇_z ℓ = −e_y``.
- **Fisher.** The Hessian of ``ℓ`` in ``z`` is zero, so the loss side is not a Hessian
  here but the Fisher of the categorical model in these coordinates,
  ``E_{ŷ~p}[∇_z ℓ(ŷ) ∇_z ℓ(ŷ)ᵀ] = E[e_ŷ e_ŷᵀ] = diag(p)``; its square root is
  ``S = diag(√p)`` (``C`` columns per position, rank ``C``), and ``β = −e_y/√p_y`` gives
  ``Sβ = r`` exactly (``1/√p_y = e^{−z_y/2}``, no cancellation).
- **The same Fisher as cross-entropy.** With ``z = log_softmax(f)`` the network's
  Jacobian carries ``∂z/∂f = I − 1pᵀ``, and ``(I − p1ᵀ) diag(p) (I − 1pᵀ) = diag(p) − ppᵀ``
  (as ``1ᵀp = 1``), the cross-entropy's loss-Hessian in the logits; the residual maps to
  ``(I − p1ᵀ)(−e_y) = p − e_y``, the cross-entropy's. So F, EF and every metric equal
  those of ``CrossEntropyLoss`` on the logits ``f``: NLL on log-probabilities is the same
  negative log-likelihood, only the last ``log_softmax`` sits inside the network.
- **Labels drawn from the model** are ``ŷ ~ p`` (Gumbel-max on ``z``), residual
  ``−e_ŷ``; a sketch is ``√p ⊙ w``, ``E[ssᵀ] = diag(p)``.

``p`` is formed as ``softmax(z)`` in float64, so that rounding of ``z`` in the network's
precision does not leave ``Σ p ≠ 1``. The inputs must be log-probabilities: outputs whose
``logsumexp`` over the classes is not 0 (raw logits) are refused, pointing to
``CrossEntropyLoss``. The backends evaluate the probe loss with ``CrossEntropyLoss`` on
``z``, which equals the NLL there (``log_softmax`` leaves log-probabilities unchanged) and
which BackPACK can start its backward pass from; the columns it backpropagates are ours.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fisher_monitor.likelihoods.base import LOSS_SIDE_DTYPE, one_hot
from fisher_monitor.likelihoods.categorical import ClassLabels

#: Largest ``|logsumexp(z)|`` accepted as log-probabilities, for 32- and 64-bit outputs.
LOG_PROB_TOLERANCE = 1e-4
#: The same for 16-bit outputs (``log_softmax`` rounded to 8 or 11 bits).
LOG_PROB_TOLERANCE_16 = 0.1


class CategoricalLogProbs(ClassLabels):
    """``nn.NLLLoss`` on log-probabilities as the categorical negative log-likelihood."""

    module_class = nn.NLLLoss
    name = "nll"

    def make_module(self) -> nn.Module:
        """``CrossEntropyLoss`` with these options: on log-probabilities it is the NLL."""
        return nn.CrossEntropyLoss(reduction=self.reduction, ignore_index=self.ignore_index)

    def check_batch(self, outputs: Tensor, targets: Tensor) -> None:  # noqa: D102
        super().check_batch(outputs, targets)
        if not outputs.numel():
            return
        total = torch.logsumexp(outputs.detach().to(LOSS_SIDE_DTYPE), dim=1)
        worst = float(total.abs().max())
        tolerance = LOG_PROB_TOLERANCE if outputs.element_size() >= 4 else LOG_PROB_TOLERANCE_16
        if not worst <= tolerance:  # also catches NaN
            raise ValueError(
                f"{self.loss_name} needs log-probabilities (log_softmax outputs) as input, but "
                f"the outputs' logsumexp over the classes (dimension 1) is up to {worst:.3g}, "
                "not 0: these are not log-probabilities. For raw logits monitor "
                "`CrossEntropyLoss` instead (`loss_fn=nn.CrossEntropyLoss()`), which applies "
                "log_softmax itself; or end the network with `nn.LogSoftmax(dim=1)`."
            )

    def residuals(self, outputs: Tensor, targets: Tensor) -> Tensor:  # noqa: D102
        observed = one_hot(targets, outputs.shape[1], dtype=outputs.dtype)
        kept = self.kept(targets).unsqueeze(1).to(outputs.dtype)
        return (-observed * kept).reshape(outputs.shape[0], -1)

    def sqrt_hessian(self, outputs: Tensor) -> Tensor:  # noqa: D102
        roots = (0.5 * outputs.log_softmax(dim=1)).exp()
        return torch.diag_embed(roots.reshape(outputs.shape[0], -1))

    def coefficients(self, outputs: Tensor, targets: Tensor) -> Tensor:  # noqa: D102
        observed = one_hot(targets, outputs.shape[1], dtype=torch.bool)
        observed = observed & self.kept(targets).unsqueeze(1)
        inverse_root = (-0.5 * outputs.log_softmax(dim=1)).exp()  # may overflow off y: where
        beta = torch.where(observed, -inverse_root, torch.zeros_like(inverse_root))
        return beta.reshape(outputs.shape[0], -1)

    def sampled_residuals(self, outputs: Tensor, noise: Tensor) -> Tensor:  # noqa: D102
        n, samples = noise.shape[:2]
        _, drawn = self.draw_labels(outputs, noise)
        return -drawn.reshape(n, samples, -1).transpose(1, 2) / samples**0.5

    def sketch_columns(self, outputs: Tensor, signs: Tensor) -> Tensor:
        """``√p ⊙ w/√k`` per output entry (``S = diag(√p)``): ``(N, K, k)``."""
        n, k = signs.shape[:2]
        roots = (0.5 * outputs.log_softmax(dim=1)).exp().unsqueeze(1)
        columns = roots.mul(k**-0.5) * signs
        return columns.reshape(n, k, -1).transpose(1, 2)


__all__ = ["CategoricalLogProbs"]
