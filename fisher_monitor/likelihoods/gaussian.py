"""Mean squared error: a Gaussian likelihood with fixed variance.

Outputs and targets of the same shape ``(N, *sample_shape)``, ``K`` entries per sample. With
reduction ``"mean"`` (over all ``N·K`` entries) the per-sample loss is
``ℓ_n = ‖f_n − y_n‖²/K``, the negative log-likelihood of a Gaussian with variance ``K/2``
(up to constants); with ``"sum"``, ``ℓ_n = ‖f_n − y_n‖²`` (variance ½). So ``∇²_f ℓ_n = c·I``
with ``c = 2/K`` or ``2``, ``S = √c I``, ``r_n = c(f_n − y_n)`` and ``β_n = √c (f_n − y_n)``;
a label drawn from the model, ``ŷ = f + σε``, gives the residual ``−√c ε``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fisher_monitor.likelihoods.base import LOSS_SIDE_DTYPE, Likelihood


class Gaussian(Likelihood):
    """``nn.MSELoss`` as a Gaussian negative log-likelihood (variance ``K/2`` or ½)."""

    module_class = nn.MSELoss
    name = "mse"

    def curvature(self, outputs: Tensor) -> float:
        """``c`` with ``∇²_f ℓ_n = c·I``: ``2/K`` for ``"mean"``, 2 for ``"sum"``."""
        size = outputs[0].numel()
        return 2.0 / size if self.reduction == "mean" else 2.0

    def check_batch(self, outputs: Tensor, targets: Tensor) -> None:  # noqa: D102
        shapes = f"outputs {tuple(outputs.shape)}, targets {tuple(targets.shape)}"
        if outputs.dim() < 1:
            raise ValueError(f"{self.loss_name} needs a batch dimension, got {shapes}.")
        if targets.shape != outputs.shape:
            raise ValueError(
                f"{self.loss_name} needs targets of the same shape as the outputs, got {shapes}; "
                "PyTorch would broadcast them and compute a different loss. Reshape the "
                f"targets to {tuple(outputs.shape)}."
            )
        if not targets.is_floating_point():
            raise ValueError(
                f"{self.loss_name} needs floating-point targets, got {targets.dtype} targets "
                f"({shapes}). Convert them, e.g. `batch_to_inputs_targets=lambda batch: "
                "(batch[0], batch[1].float())`, or `targets.float()` in `probe_data`."
            )

    def residuals(self, outputs: Tensor, targets: Tensor) -> Tensor:  # noqa: D102
        difference = outputs - targets.to(outputs.dtype)
        return self.curvature(outputs) * difference.reshape(outputs.shape[0], -1)

    def sqrt_hessian(self, outputs: Tensor) -> Tensor:  # noqa: D102
        n, size = outputs.shape[0], outputs[0].numel()
        eye = torch.eye(size, dtype=outputs.dtype, device=outputs.device)
        return (self.curvature(outputs) ** 0.5 * eye).expand(n, size, size)

    def coefficients(self, outputs: Tensor, targets: Tensor) -> Tensor:  # noqa: D102
        difference = outputs - targets.to(outputs.dtype)
        return self.curvature(outputs) ** 0.5 * difference.reshape(outputs.shape[0], -1)

    def draw_noise(self, outputs: Tensor, samples: int) -> Tensor:  # noqa: D102
        shape = (outputs.shape[0], samples, *outputs.shape[1:])
        return torch.randn(shape, dtype=LOSS_SIDE_DTYPE, device=outputs.device)

    def sampled_residuals(self, outputs: Tensor, noise: Tensor) -> Tensor:  # noqa: D102
        n, samples = noise.shape[:2]
        scale = -(self.curvature(outputs) ** 0.5) / samples**0.5
        return scale * noise.reshape(n, samples, -1).transpose(1, 2)

    def sketch_sign_shape(self, outputs: Tensor, columns: int) -> tuple[int, ...]:  # noqa: D102
        return (outputs.shape[0], columns, *outputs.shape[1:])

    def sketch_columns(self, outputs: Tensor, signs: Tensor) -> Tensor:
        """``√c w/√k`` (``S = √c I``): ``(N, K, k)``."""
        n, k = signs.shape[:2]
        columns = (k**-0.5 * self.curvature(outputs) ** 0.5) * signs
        return columns.reshape(n, k, -1).transpose(1, 2)

    def hessian_product(self, outputs: Tensor, vectors: Tensor) -> Tensor:
        """``c u`` (``H = cI``)."""
        return self.curvature(outputs) * vectors
