"""Cross-entropy: the categorical likelihood ``p(y | f) = softmax(f)_y``.

Outputs ``(N, C, *positions)`` with integer targets ``(N, *positions)``: a sample's negative
log-likelihood is the sum over its ``T`` positions, ``ℓ_n = −Σ_t log softmax(f_{n,:,t})_{y_{n,t}}``,
whatever the reduction (``"mean"`` divides the loss by ``N·T``, a constant that F and EF
must not see, or their ratio would depend on ``T``).

Per position, with ``p = softmax(f)`` and ``τ = √p``: the Hessian ``diag(p) − ppᵀ`` has rank
``C − 1`` and the square root ``S = diag(τ) Q`` (``Q`` an orthonormal basis of ``τ``'s
complement, :func:`complement_basis`); the residual ``p − e_y`` equals ``Sβ`` with
``β = −Q[y, :]ᵀ/τ_y`` (derived from ``β = Qᵀ(τ − e_y/τ_y)`` and ``Qᵀτ = 0``). The residual's
``y`` entry is formed as ``−Σ_{c≠y} p_c``, so it keeps every digit as ``p_y → 1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fisher_monitor.likelihoods.base import (
    LOSS_SIDE_DTYPE,
    Likelihood,
    UnsupportedLossError,
    one_hot,
)


class Categorical(Likelihood):
    """``nn.CrossEntropyLoss`` as the categorical negative log-likelihood."""

    module_class = nn.CrossEntropyLoss
    name = "cross_entropy"

    @classmethod
    def from_module(cls, module: nn.Module) -> Categorical:  # noqa: D102
        if module.weight is not None:
            raise UnsupportedLossError(
                "CrossEntropyLoss with class `weight` is not a negative log-likelihood of the "
                "categorical model, so its Fisher is undefined. Monitor an unweighted "
                "`CrossEntropyLoss()` via `loss_fn=`."
            )
        if module.label_smoothing != 0.0:
            raise UnsupportedLossError(
                f"CrossEntropyLoss(label_smoothing={module.label_smoothing!r}) is not the "
                "negative log-likelihood of the observed labels, so its empirical Fisher is not "
                "the one the paper studies. Monitor `CrossEntropyLoss()` via `loss_fn=`."
            )
        if module.ignore_index != -100:
            raise UnsupportedLossError(
                f"CrossEntropyLoss(ignore_index={module.ignore_index!r}) is not supported: "
                "ignored targets change the per-sample normalisation. Filter ignored samples "
                "out of the probe batch and monitor `CrossEntropyLoss()`."
            )
        return cls(module.reduction)

    def check_batch(self, outputs: Tensor, targets: Tensor) -> None:  # noqa: D102
        shapes = f"outputs {tuple(outputs.shape)}, targets {tuple(targets.shape)}"
        if targets.is_floating_point():
            raise ValueError(
                f"{self.loss_name} needs integer class indices as targets for the Fisher "
                f"comparison, got {targets.dtype} targets ({shapes}). Class-probability "
                "(soft) targets are not labels of the categorical likelihood; pass "
                "`targets.argmax(dim=1)` or monitor a loss with hard labels."
            )
        if outputs.dim() < 2 or targets.shape != (outputs.shape[0], *outputs.shape[2:]):
            raise ValueError(
                f"{self.loss_name} expects outputs of shape (N, C, ...) and targets of shape "
                f"(N, ...), got {shapes}."
            )
        if outputs.shape[1] < 2:
            raise ValueError(
                f"{self.loss_name} needs at least 2 classes (outputs of shape (N, C, ...) with "
                f"C ≥ 2), got {shapes}; for one logit per sample use BCEWithLogitsLoss."
            )
        if targets.numel() and (targets.min() < 0 or targets.max() >= outputs.shape[1]):
            bad = targets[(targets < 0) | (targets >= outputs.shape[1])][0].item()
            raise ValueError(
                f"{self.loss_name} targets must be class indices in [0, {outputs.shape[1]}), "
                f"found {bad!r} ({shapes}). Targets equal to `ignore_index` (-100) would "
                "drop samples from the loss and are not supported; filter them out."
            )

    def fisher_columns(self, sample_shape: Sequence[int]) -> int:  # noqa: D102
        classes, positions = sample_shape[0], 1
        for size in sample_shape[1:]:
            positions *= int(size)
        return (int(classes) - 1) * positions

    def residuals(self, outputs: Tensor, targets: Tensor) -> Tensor:  # noqa: D102
        probs = outputs.softmax(dim=1)
        observed = one_hot(targets, outputs.shape[1], dtype=probs.dtype)
        return _residual(probs, observed).reshape(outputs.shape[0], -1)

    def sqrt_hessian(self, outputs: Tensor) -> Tensor:  # noqa: D102
        n, classes = outputs.shape[:2]
        tau = _per_position(0.5 * outputs.log_softmax(dim=1)).exp()  # (N, T, C)
        positions = tau.shape[1]
        blocks = tau.unsqueeze(-1) * complement_basis(tau)  # (N, T, C, C − 1)
        eye = torch.eye(positions, dtype=tau.dtype, device=tau.device)
        # block-diagonal over positions; rows (c, t) as the output flattens, columns (r, t)
        full = torch.einsum("ntcr,ts->ncsrt", blocks, eye)
        return full.reshape(n, classes * positions, (classes - 1) * positions)

    def coefficients(self, outputs: Tensor, targets: Tensor) -> Tensor:  # noqa: D102
        n, classes = outputs.shape[:2]
        log_probs = _per_position(outputs.log_softmax(dim=1))  # (N, T, C)
        observed = one_hot(targets.reshape(n, -1), classes, dim=2, dtype=log_probs.dtype)
        basis = complement_basis((0.5 * log_probs).exp())  # (N, T, C, C − 1)
        row = (observed.unsqueeze(-1) * basis).sum(dim=2)  # Q[y, :], (N, T, C − 1)
        inverse_tau = (-0.5 * (log_probs * observed).sum(dim=2, keepdim=True)).exp()
        beta = -row * inverse_tau  # (N, T, C − 1)
        return beta.transpose(1, 2).reshape(n, -1)  # columns (r, t)

    def draw_noise(self, outputs: Tensor, samples: int) -> Tensor:  # noqa: D102
        shape = (outputs.shape[0], samples, *outputs.shape[1:])
        return torch.rand(shape, dtype=LOSS_SIDE_DTYPE, device=outputs.device)

    def sampled_residuals(self, outputs: Tensor, noise: Tensor) -> Tensor:  # noqa: D102
        n, samples = noise.shape[:2]
        log_probs = outputs.log_softmax(dim=1).unsqueeze(1)  # (N, 1, C, ...)
        gumbel = -torch.log(-torch.log(noise.clamp(1e-300, 1 - 1e-16)))
        labels = (log_probs + gumbel).argmax(dim=2)  # Gumbel-max: (N, M, ...)
        drawn = one_hot(labels, outputs.shape[1], dim=2, dtype=log_probs.dtype)
        residual = _residual(log_probs.exp().expand_as(drawn), drawn, class_dim=2)
        return residual.reshape(n, samples, -1).transpose(1, 2) / samples**0.5

    def sketch_sign_shape(self, outputs: Tensor, columns: int) -> tuple[int, ...]:  # noqa: D102
        return (outputs.shape[0], columns, *outputs.shape[1:])

    def sketch_columns(self, outputs: Tensor, signs: Tensor) -> Tensor:
        """``τ ⊙ (w − τ(τᵀw))/√k`` per position, without forming ``S``: ``(N, K, k)``.

        With ``τ = √p``, ``S = diag(τ) Q`` and ``QQᵀ = I − ττᵀ``, so signs ``w`` in the class
        coordinates give ``E[ssᵀ] = diag(p) − ppᵀ`` in ``O(C)`` per position; computed as
        ``t − p Σ_c t_c`` with ``t = τ ⊙ w/√k`` (three passes over ``N·k·C``).
        """
        n, k = signs.shape[:2]
        log_probs = outputs.log_softmax(dim=1).unsqueeze(1)  # (N, 1, C, ...)
        columns = (0.5 * log_probs).exp().mul_(k**-0.5) * signs
        projection = columns.sum(dim=2, keepdim=True)
        columns.addcmul_(log_probs.exp(), projection, value=-1.0)
        return columns.reshape(n, k, -1).transpose(1, 2)

    def hessian_product(self, outputs: Tensor, vectors: Tensor) -> Tensor:
        """``p ⊙ u − p (pᵀu)`` per position (``H = diag(p) − ppᵀ``), in ``O(C)``."""
        probs = outputs.softmax(dim=1)
        weighted = probs * vectors
        return weighted - probs * weighted.sum(dim=1, keepdim=True)


def _residual(probs: Tensor, observed: Tensor, class_dim: int = 1) -> Tensor:
    """``p − e_y`` with the ``y`` entry formed as ``−Σ_{c≠y} p_c`` (no ``p_y − 1`` cancellation)."""
    others = probs * (1 - observed)
    return others - observed * others.sum(dim=class_dim, keepdim=True)


def _per_position(values: Tensor) -> Tensor:
    """``(N, C, *positions)`` to ``(N, T, C)``."""
    n, classes = values.shape[:2]
    return values.reshape(n, classes, -1).transpose(1, 2)


def complement_basis(unit: Tensor) -> Tensor:
    """Orthonormal bases of the complement of unit vectors with non-negative entries.

    A Householder reflection ``P = I − 2uuᵀ/‖u‖²`` with ``u = τ + e₀`` swaps ``e₀`` and
    ``−τ``; its other ``C − 1`` columns are orthonormal and orthogonal to ``τ``. Since
    ``τ₀ ≥ 0``, ``‖u‖² = 2 + 2τ₀ ≥ 2``: no cancellation, whatever the prediction.

    Args:
        unit: ``(..., C)`` unit vectors with entries ``≥ 0`` (e.g. ``√softmax``).

    Returns:
        ``(..., C, C − 1)`` bases.
    """
    classes = unit.shape[-1]
    eye = torch.eye(classes, dtype=unit.dtype, device=unit.device)
    u = unit + eye[0]  # out of place: also used under torch.func transforms
    scale = 2.0 / u.square().sum(dim=-1, keepdim=True)
    reflector = eye - scale.unsqueeze(-1) * u.unsqueeze(-1) * u.unsqueeze(-2)
    return reflector[..., 1:]
