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

A position whose target is ``ignore_index`` is not part of ``ℓ_n`` (PyTorch leaves it out of
the loss): its residual, its rows of ``S`` and its coefficients are zero, so F and EF are
both built from the positions that count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fisher_monitor.likelihoods.base import (
    LOSS_SIDE_DTYPE,
    Likelihood,
    UnsupportedLossError,
    one_hot,
)

#: PyTorch's default ``ignore_index``.
DEFAULT_IGNORE_INDEX = -100


class ClassLabels(Likelihood):
    """A likelihood of class labels ``(N, *positions)`` over outputs ``(N, C, *positions)``.

    Holds what cross-entropy and the negative log-likelihood share: ``ignore_index`` (a
    position whose target equals it drops out of ``ℓ_n``, as it drops out of PyTorch's
    loss; a sample whose every position is ignored has ``ℓ_n = 0`` and contributes
    nothing), the refusal of class weights, and the checks of the targets.

    Args:
        reduction: ``"mean"`` or ``"sum"``.
        ignore_index: Target value whose positions are left out.
    """

    def __init__(self, reduction: str = "mean", ignore_index: int = DEFAULT_IGNORE_INDEX):
        super().__init__(reduction)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise UnsupportedLossError(
                f"{self.module_class.__name__}(ignore_index={ignore_index!r}) is not "
                "supported: use an integer class index (PyTorch's default is -100)."
            )
        self.ignore_index = ignore_index

    def options(self) -> dict[str, Any]:  # noqa: D102
        return {"ignore_index": self.ignore_index}

    @classmethod
    def from_module(cls, module: nn.Module) -> ClassLabels:  # noqa: D102
        if getattr(module, "weight", None) is not None:
            name = module.__class__.__name__
            raise UnsupportedLossError(
                f"{name} with class `weight` is not a negative log-likelihood of the "
                "categorical model, so its Fisher is undefined. Monitor the unweighted "
                f"`{name}()` via `loss_fn=`."
            )
        return cls(module.reduction, module.ignore_index)

    def draw_noise(self, outputs: Tensor, samples: int) -> Tensor:  # noqa: D102
        shape = (outputs.shape[0], samples, *outputs.shape[1:])
        return torch.rand(shape, dtype=LOSS_SIDE_DTYPE, device=outputs.device)

    @staticmethod
    def draw_labels(outputs: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """Labels drawn from the model by Gumbel-max from uniform ``noise`` ``(N, M, C, ...)``.

        Returns the log-probabilities ``(N, 1, C, ...)`` and the drawn labels one-hot
        ``(N, M, C, ...)``.
        """
        log_probs = outputs.log_softmax(dim=1).unsqueeze(1)  # (N, 1, C, ...)
        gumbel = -torch.log(-torch.log(noise.clamp(1e-300, 1 - 1e-16)))
        labels = (log_probs + gumbel).argmax(dim=2)  # Gumbel-max: (N, M, ...)
        return log_probs, one_hot(labels, outputs.shape[1], dim=2, dtype=log_probs.dtype)

    def sketch_sign_shape(self, outputs: Tensor, columns: int) -> tuple[int, ...]:  # noqa: D102
        return (outputs.shape[0], columns, *outputs.shape[1:])

    def kept(self, targets: Tensor) -> Tensor:
        """``(N, *positions)``: 1 where the target counts, 0 where it is ``ignore_index``."""
        return targets != self.ignore_index

    def output_mask(self, targets: Tensor, sample_shape: Sequence[int]) -> Tensor:  # noqa: D102
        kept = self.kept(targets).unsqueeze(1).expand(targets.shape[0], *sample_shape)
        return kept.reshape(targets.shape[0], -1).to(LOSS_SIDE_DTYPE)

    def check_batch(self, outputs: Tensor, targets: Tensor) -> None:  # noqa: D102
        shapes = f"outputs {tuple(outputs.shape)}, targets {tuple(targets.shape)}"
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise ValueError(self._not_class_indices(outputs, targets, shapes))
        if targets.dtype != torch.long:
            raise ValueError(
                f"{self.loss_name} takes class indices as int64 (torch.long), got "
                f"{targets.dtype} targets ({shapes}); PyTorch's loss refuses them. Convert "
                "them, e.g. `batch_to_inputs_targets=lambda batch: (batch[0], "
                "batch[1].long())`, or `targets.long()` in `probe_data`."
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
        bad = (targets < 0) | (targets >= outputs.shape[1])
        bad &= self.kept(targets)
        if targets.numel() and bool(bad.any()):
            raise ValueError(
                f"{self.loss_name} targets must be class indices in [0, {outputs.shape[1]}) "
                f"or ignore_index ({self.ignore_index}), found {targets[bad][0].item()!r} "
                f"({shapes})."
            )

    def _not_class_indices(self, outputs: Tensor, targets: Tensor, shapes: str) -> str:
        """The message for floating-point (or boolean) targets: what they look like, the fix."""
        head = f"{self.loss_name} needs integer class indices as targets, got {targets.dtype} "
        if targets.dim() == outputs.dim() and targets.shape == outputs.shape:
            return (
                head + f"targets of the outputs' shape ({shapes}): one-hot or class-probability "
                "targets. For one-hot labels convert them to class indices, e.g. "
                "`batch_to_inputs_targets=lambda batch: (batch[0], batch[1].argmax(dim=1))`; "
                "soft (probability) targets are not labels of the categorical likelihood, "
                "so their empirical Fisher is not defined."
            )
        return (
            head + f"class labels ({shapes}). Convert them to int64 class indices, e.g. "
            "`batch_to_inputs_targets=lambda batch: (batch[0], batch[1].long())` (or "
            "`targets.long()` in `probe_data`)."
        )


class Categorical(ClassLabels):
    """``nn.CrossEntropyLoss`` as the categorical negative log-likelihood."""

    module_class = nn.CrossEntropyLoss
    name = "cross_entropy"

    @classmethod
    def from_module(cls, module: nn.Module) -> ClassLabels:  # noqa: D102
        if module.label_smoothing != 0.0:
            raise UnsupportedLossError(label_smoothing_message(module.label_smoothing))
        return super().from_module(module)

    def fisher_columns(self, sample_shape: Sequence[int]) -> int:  # noqa: D102
        classes, positions = sample_shape[0], 1
        for size in sample_shape[1:]:
            positions *= int(size)
        return (int(classes) - 1) * positions

    def residuals(self, outputs: Tensor, targets: Tensor) -> Tensor:  # noqa: D102
        probs = outputs.softmax(dim=1)
        observed = one_hot(targets, outputs.shape[1], dtype=probs.dtype)
        kept = self.kept(targets).unsqueeze(1).to(probs.dtype)
        return (_residual(probs, observed) * kept).reshape(outputs.shape[0], -1)

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
        kept = self.kept(targets).reshape(n, -1, 1)
        beta = torch.where(kept, beta, torch.zeros_like(beta))  # ignored: no residual
        return beta.transpose(1, 2).reshape(n, -1)  # columns (r, t)

    def sampled_residuals(self, outputs: Tensor, noise: Tensor) -> Tensor:  # noqa: D102
        n, samples = noise.shape[:2]
        log_probs, drawn = self.draw_labels(outputs, noise)
        residual = _residual(log_probs.exp().expand_as(drawn), drawn, class_dim=2)
        return residual.reshape(n, samples, -1).transpose(1, 2) / samples**0.5

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


def label_smoothing_message(smoothing: float) -> str:
    """Why a smoothed cross-entropy is refused, and what to monitor instead."""
    return (
        f"CrossEntropyLoss(label_smoothing={smoothing!r}) is not a negative log-likelihood: "
        "the smoothed loss is (1 − ε)·(−log p_y) plus ε times the average −log p_c over all "
        "classes, a penalty on the predictions rather than the likelihood of a label. Its "
        "per-sample gradients are not scores of the model, so there is no empirical Fisher "
        "of it to compare with the Fisher (nor is its Hessian the Fisher). Monitor the "
        "model's categorical likelihood, the one the smoothing regularises: pass "
        "`loss_fn=nn.CrossEntropyLoss()` (with the same `ignore_index`) to FisherMonitor "
        "or measure()."
    )


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
