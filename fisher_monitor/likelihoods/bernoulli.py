"""Binary cross-entropy on logits: a Bernoulli likelihood.

One logit per sample, ``(N,)`` or ``(N, 1)``, with 0/1 targets of the same shape. With
``σ = sigmoid(f)``: the Hessian is ``σ(1 − σ)``, ``S = √(σ(1 − σ))``, the residual ``σ − y``
and ``β = (σ − y)/S``, which is ``e^{f/2}`` for ``y = 0`` and ``−e^{−f/2}`` for ``y = 1``:
closed forms that never cancel, however saturated ``σ`` is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fisher_monitor.likelihoods.base import LOSS_SIDE_DTYPE, Likelihood, UnsupportedLossError


class Bernoulli(Likelihood):
    """``nn.BCEWithLogitsLoss`` as a Bernoulli negative log-likelihood on the logits."""

    module_class = nn.BCEWithLogitsLoss
    name = "bce_with_logits"

    @classmethod
    def from_module(cls, module: nn.Module) -> Bernoulli:  # noqa: D102
        if module.weight is not None or module.pos_weight is not None:
            raise UnsupportedLossError(
                "BCEWithLogitsLoss with `weight` or `pos_weight` is not a Bernoulli negative "
                "log-likelihood. Monitor `BCEWithLogitsLoss()` via `loss_fn=`."
            )
        return cls(module.reduction)

    def check_batch(self, outputs: Tensor, targets: Tensor) -> None:  # noqa: D102
        shapes = f"outputs {tuple(outputs.shape)}, targets {tuple(targets.shape)}"
        if outputs.dim() not in (1, 2) or outputs[0].numel() != 1:
            raise ValueError(
                f"{self.loss_name} is supported for a single logit per sample, outputs of shape "
                f"(N,) or (N, 1), got {shapes}."
            )
        if not targets.is_floating_point():
            raise ValueError(
                f"{self.loss_name} needs floating-point 0/1 targets, got {targets.dtype} "
                f"targets ({shapes}); PyTorch's loss refuses integer ones. Convert them, e.g. "
                "`batch_to_inputs_targets=lambda batch: (batch[0], batch[1].float())`, or "
                "`targets.float()` in `probe_data`."
            )
        if targets.shape != outputs.shape:
            fix = "targets.unsqueeze(1)" if outputs.dim() == 2 else "targets.reshape(-1)"
            raise ValueError(
                f"{self.loss_name} needs targets of shape {tuple(outputs.shape)}, got {shapes}. "
                f"Reshape them, e.g. `{fix}`."
            )
        if targets.numel() and not torch.all((targets == 0) | (targets == 1)):
            raise ValueError(
                f"{self.loss_name} needs binary (0/1) targets for the Bernoulli likelihood, got "
                "other values."
            )

    def residuals(self, outputs: Tensor, targets: Tensor) -> Tensor:  # noqa: D102
        labels = targets.to(outputs.dtype)
        # σ − 1 = −sigmoid(−f): no cancellation for confident positives
        residual = labels * -torch.sigmoid(-outputs) + (1 - labels) * torch.sigmoid(outputs)
        return residual.reshape(outputs.shape[0], -1)

    def sqrt_hessian(self, outputs: Tensor) -> Tensor:  # noqa: D102
        flat = outputs.reshape(outputs.shape[0], -1)
        root = torch.nn.functional.logsigmoid(flat) + torch.nn.functional.logsigmoid(-flat)
        return torch.diag_embed((0.5 * root).exp())

    def coefficients(self, outputs: Tensor, targets: Tensor) -> Tensor:  # noqa: D102
        flat = outputs.reshape(outputs.shape[0], -1)
        labels = targets.reshape(flat.shape).to(flat.dtype)
        # where, not a blend: the branch not taken may overflow (0 · inf would be NaN)
        return torch.where(labels > 0.5, -(-0.5 * flat).exp(), (0.5 * flat).exp())

    def draw_noise(self, outputs: Tensor, samples: int) -> Tensor:  # noqa: D102
        shape = (outputs.shape[0], samples, *outputs.shape[1:])
        return torch.rand(shape, dtype=LOSS_SIDE_DTYPE, device=outputs.device)

    def sampled_residuals(self, outputs: Tensor, noise: Tensor) -> Tensor:  # noqa: D102
        n, samples = noise.shape[:2]
        logits = outputs.unsqueeze(1)
        drawn = (noise < torch.sigmoid(logits)).to(outputs.dtype)
        residual = drawn * -torch.sigmoid(-logits) + (1 - drawn) * torch.sigmoid(logits)
        return residual.reshape(n, samples, -1).transpose(1, 2) / samples**0.5

    def sketch_sign_shape(self, outputs: Tensor, columns: int) -> tuple[int, ...]:  # noqa: D102
        return (outputs.shape[0], columns, *outputs.shape[1:])

    def sketch_columns(self, outputs: Tensor, signs: Tensor) -> Tensor:
        """``√(σ(1 − σ)) w/√k`` per output entry: ``(N, K, k)``."""
        n, k = signs.shape[:2]
        logits = outputs.unsqueeze(1)
        root = torch.nn.functional.logsigmoid(logits) + torch.nn.functional.logsigmoid(-logits)
        columns = (0.5 * root).exp().mul_(k**-0.5) * signs
        return columns.reshape(n, k, -1).transpose(1, 2)

    def hessian_product(self, outputs: Tensor, vectors: Tensor) -> Tensor:
        """``σ(1 − σ) u`` per logit."""
        return torch.sigmoid(outputs) * torch.sigmoid(-outputs) * vectors
