"""Supported losses, read as negative log-likelihoods, and their validation.

Per DESIGN.md §2 every supported loss is ``L = (1/N) Σ_n ℓ_n`` (reduction ``"mean"``) or
``L = Σ_n ℓ_n`` (reduction ``"sum"``) with ``ℓ_n = −log p(y_n | f_n)`` up to constants:

- ``CrossEntropyLoss``: categorical likelihood ``softmax(f)_y``;
- ``MSELoss``: Gaussian; with ``"mean"`` over ``N·K`` entries ``ℓ_n = ‖f_n − y_n‖²/K``
  (variance ``K/2``), with ``"sum"`` ``ℓ_n = ‖f_n − y_n‖²`` (variance ½);
- ``BCEWithLogitsLoss``: Bernoulli on the logit.

Options that break the likelihood reading (class weights, label smoothing, soft
targets, ``ignore_index`` entries) are rejected with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor, nn


class LossKind(str, Enum):
    """The likelihoods fisher-monitor understands."""

    CROSS_ENTROPY = "cross_entropy"
    MSE = "mse"
    BCE_WITH_LOGITS = "bce_with_logits"


_LOSS_CLASSES: dict[type[nn.Module], LossKind] = {
    nn.CrossEntropyLoss: LossKind.CROSS_ENTROPY,
    nn.MSELoss: LossKind.MSE,
    nn.BCEWithLogitsLoss: LossKind.BCE_WITH_LOGITS,
}

SUPPORTED_LOSSES = tuple(cls.__name__ for cls in _LOSS_CLASSES) + tuple(k.value for k in LossKind)


class UnsupportedLossError(ValueError):
    """The loss cannot be read as a supported negative log-likelihood."""


@dataclass(frozen=True)
class LossSpec:
    """A validated loss: which likelihood and which reduction.

    Attributes:
        kind: The likelihood.
        reduction: ``"mean"`` or ``"sum"``.
    """

    kind: LossKind
    reduction: str

    @property
    def name(self) -> str:
        """Class name of the loss module, e.g. ``"CrossEntropyLoss"``."""
        return {
            LossKind.CROSS_ENTROPY: "CrossEntropyLoss",
            LossKind.MSE: "MSELoss",
            LossKind.BCE_WITH_LOGITS: "BCEWithLogitsLoss",
        }[self.kind]

    def make_module(self) -> nn.Module:
        """Return a fresh loss module with this reduction (never the caller's own)."""
        cls = {
            LossKind.CROSS_ENTROPY: nn.CrossEntropyLoss,
            LossKind.MSE: nn.MSELoss,
            LossKind.BCE_WITH_LOGITS: nn.BCEWithLogitsLoss,
        }[self.kind]
        return cls(reduction=self.reduction)

    def per_sample_scale(self, batch_size: int) -> float:
        """Factor turning the loss's output gradients into per-sample ones, ``∇ℓ_n``."""
        return float(batch_size) if self.reduction == "mean" else 1.0

    def sqrt_scale(self, batch_size: int) -> float:
        """Factor turning BackPACK's loss-Hessian square root into ``F = VVᵀ`` (a mean)."""
        return 1.0 if self.reduction == "mean" else batch_size**-0.5

    # ---------------------------------------------------------------- one sample at a time
    # Closed forms used by the torch.func backend. ``output`` is one sample's output (no
    # batch dimension); ℓ is the loss module applied to a batch of that one sample.

    def _positions(self, output: Tensor) -> int:
        return output[0].numel() if self.kind is LossKind.CROSS_ENTROPY else 1

    def observed_gradient(self, output: Tensor, target: Tensor) -> Tensor:
        """``∇_f ℓ(f, y)`` for one sample, shaped like ``output``."""
        if self.kind is LossKind.CROSS_ENTROPY:
            probs = output.softmax(dim=0)
            onehot = _one_hot(target, output.shape[0])
            scale = 1.0 / self._positions(output) if self.reduction == "mean" else 1.0
            return (probs - onehot.to(probs.dtype)) * scale
        if self.kind is LossKind.MSE:
            scale = 2.0 / output.numel() if self.reduction == "mean" else 2.0
            return scale * (output - target)
        return torch.sigmoid(output) - target

    def sqrt_hessian(self, output: Tensor) -> Tensor:
        """``S`` with ``SSᵀ = ∇²_f ℓ`` for one sample: ``(output.numel(), R)`` columns."""
        if self.kind is LossKind.CROSS_ENTROPY:
            classes, positions = output.shape[0], self._positions(output)
            tau = output.reshape(classes, positions).softmax(dim=0).sqrt().T  # (T, C)
            # diag(√p) Q: Q an orthonormal basis of √p's complement (rank C − 1)
            blocks = tau.unsqueeze(-1) * complement_basis(tau)  # (T, C, C − 1)
            if self.reduction == "mean":
                blocks = blocks / positions**0.5
            eye = torch.eye(positions, dtype=output.dtype, device=output.device)
            # block-diagonal over positions, rows in the output's (C, T) order
            full = torch.einsum("tcr,ts->ctsr", blocks, eye)
            return full.reshape(classes * positions, positions * (classes - 1))
        if self.kind is LossKind.MSE:
            size = output.numel()
            scale = (2.0 / size) ** 0.5 if self.reduction == "mean" else 2.0**0.5
            return scale * torch.eye(size, dtype=output.dtype, device=output.device)
        probs = torch.sigmoid(output).reshape(1)
        return (probs * (1 - probs)).sqrt().reshape(1, 1)

    def sqrt_coefficients(self, outputs: Tensor, targets: Tensor) -> Tensor | None:
        """``β_n`` with ``S_n β_n = ∇_f ℓ(f_n, y_n)``, ``(N, R_n)`` in float64.

        Each observed-label gradient written in the exact Fisher's own square-root columns.
        For these likelihoods the gradient at the observed label lies in the range of the
        loss Hessian, so ``g_n = J_nᵀ S_n β_n``: the per-sample gradients are combinations
        of the Fisher factor's columns. ``None`` where that fails numerically (e.g. a
        saturated probability) or for outputs with extra dimensions.
        """
        if outputs.dim() != 2:
            return None
        outputs = outputs.detach().to(torch.float64)
        if self.kind is not LossKind.MSE:
            targets = targets.detach()
        else:
            targets = targets.detach().to(torch.float64)
        roots = torch.func.vmap(self.sqrt_hessian)(outputs)  # (N, numel, R_n)
        gradients = torch.func.vmap(self.observed_gradient)(outputs, targets).reshape(
            outputs.shape[0], -1
        )
        coefficients = torch.linalg.lstsq(roots, gradients.unsqueeze(-1)).solution.squeeze(-1)
        residual = (roots @ coefficients.unsqueeze(-1)).squeeze(-1) - gradients
        scale = gradients.norm(dim=1) + torch.finfo(torch.float64).tiny
        if not torch.isfinite(coefficients).all() or (residual.norm(dim=1) > 1e-9 * scale).any():
            return None
        return coefficients

    def draw_noise(self, outputs: Tensor, samples: int) -> Tensor:
        """Noise for :meth:`sampled_gradients`, ``(N, M, *output_shape)``, from the global RNG.

        Uniform for the categorical and the Bernoulli, standard Gaussian for the Gaussian.
        """
        shape = (outputs.shape[0], samples, *outputs.shape[1:])
        if self.kind is LossKind.MSE:
            return torch.randn(shape, dtype=outputs.dtype, device=outputs.device)
        return torch.rand(shape, dtype=outputs.dtype, device=outputs.device)

    def sampled_gradients(self, output: Tensor, noise: Tensor) -> Tensor:
        """``∇_f ℓ(f, ŷ_m)/√M`` for ``M`` labels drawn from the model: ``(numel, M)``.

        The labels come from pre-drawn ``noise`` (Gumbel-max for the categorical, a
        uniform threshold for the Bernoulli, Gaussian noise for the Gaussian), so that the
        draw is reproducible and free of in-transform randomness.
        """
        samples = noise.shape[0]
        if self.kind is LossKind.CROSS_ENTROPY:
            logits = output.log_softmax(dim=0)
            gumbel = -torch.log(-torch.log(noise.clamp(1e-12, 1 - 1e-12)))
            labels = (logits.unsqueeze(0) + gumbel).argmax(dim=1)  # (M, ...)
            onehot = _one_hot(labels, output.shape[0], dim=1)
            scale = 1.0 / self._positions(output) if self.reduction == "mean" else 1.0
            grads = (output.softmax(dim=0).unsqueeze(0) - onehot.to(output.dtype)) * scale
        elif self.kind is LossKind.MSE:
            size = output.numel()
            # ŷ = f + s ε with s² = K/2 (mean) or 1/2 (sum): ∇_f ℓ(f, ŷ) = −√(2/K) ε or −√2 ε
            scale = (2.0 / size) ** 0.5 if self.reduction == "mean" else 2.0**0.5
            grads = -scale * noise
        else:
            labels = (noise < torch.sigmoid(output).unsqueeze(0)).to(output.dtype)
            grads = torch.sigmoid(output).unsqueeze(0) - labels
        return grads.reshape(samples, -1).T / samples**0.5

    def check_batch(self, outputs: Tensor, targets: Tensor) -> None:
        """Check that outputs and targets fit this loss, with a message that names both.

        Args:
            outputs: Network outputs for the probe batch.
            targets: Targets for the probe batch.

        Raises:
            ValueError: If shapes, dtypes or values do not fit the likelihood.
        """
        shapes = f"outputs {tuple(outputs.shape)}, targets {tuple(targets.shape)}"
        if self.kind is LossKind.CROSS_ENTROPY:
            if targets.is_floating_point():
                raise ValueError(
                    f"{self.name} needs integer class indices as targets for the Fisher "
                    f"comparison, got {targets.dtype} targets ({shapes}). Class-probability "
                    "(soft) targets are not labels of the categorical likelihood; pass "
                    "`targets.argmax(dim=1)` or monitor a loss with hard labels."
                )
            if outputs.dim() < 2 or targets.shape != (outputs.shape[0], *outputs.shape[2:]):
                raise ValueError(
                    f"{self.name} expects outputs of shape (N, C, ...) and targets of shape "
                    f"(N, ...), got {shapes}."
                )
            if targets.numel() and (targets.min() < 0 or targets.max() >= outputs.shape[1]):
                bad = targets[(targets < 0) | (targets >= outputs.shape[1])][0].item()
                raise ValueError(
                    f"{self.name} targets must be class indices in [0, {outputs.shape[1]}), "
                    f"found {bad!r} ({shapes}). Targets equal to `ignore_index` (-100) would "
                    "drop samples from the loss and are not supported; filter them out."
                )
        elif self.kind is LossKind.MSE:
            if outputs.dim() != 2:
                raise ValueError(
                    f"{self.name} is supported for outputs of shape (N, K), got {shapes}. "
                    "Flatten extra output dimensions into K inside the network."
                )
            if targets.shape != outputs.shape:
                raise ValueError(
                    f"{self.name} needs targets of the same shape as the outputs, got {shapes}; "
                    "PyTorch would broadcast them and compute a different loss. Reshape the "
                    f"targets to {tuple(outputs.shape)}."
                )
            if not targets.is_floating_point():
                raise ValueError(f"{self.name} needs floating-point targets, got {targets.dtype}.")
        else:
            if outputs.dim() != 2 or outputs.shape[1] != 1:
                raise ValueError(
                    f"{self.name} is supported for a single logit per sample, outputs of shape "
                    f"(N, 1), got {shapes}."
                )
            if targets.shape != outputs.shape:
                raise ValueError(
                    f"{self.name} needs targets of shape {tuple(outputs.shape)}, got {shapes}. "
                    "Reshape them, e.g. `targets.unsqueeze(1)`."
                )
            if targets.numel() and not torch.all((targets == 0) | (targets == 1)):
                raise ValueError(
                    f"{self.name} needs binary (0/1) targets for the Bernoulli likelihood, got "
                    "other values."
                )


def _one_hot(labels: Tensor, classes: int, dim: int = 0) -> Tensor:
    """One-hot encoding with the class axis at ``dim`` (written to work under ``vmap``)."""
    shape = [1] * (labels.dim() + 1)
    shape[dim] = classes
    arange = torch.arange(classes, device=labels.device).reshape(shape)
    return (labels.unsqueeze(dim) == arange).to(torch.get_default_dtype())


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


def resolve_loss(loss_fn: nn.Module | str) -> LossSpec:
    """Validate a loss module or name and return its :class:`LossSpec`.

    Args:
        loss_fn: A ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss`` instance, or one
            of the names ``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"`` (reduction
            ``"mean"``).

    Returns:
        The validated specification.

    Raises:
        UnsupportedLossError: For any other loss or an option that breaks the
            negative-log-likelihood reading.
    """
    if isinstance(loss_fn, str):
        try:
            return LossSpec(LossKind(loss_fn), "mean")
        except ValueError:
            raise UnsupportedLossError(
                f"Unknown loss name {loss_fn!r}. Supported: {tuple(k.value for k in LossKind)}."
            ) from None
    kind = _LOSS_CLASSES.get(type(loss_fn))
    if kind is None:
        raise UnsupportedLossError(
            f"Unsupported loss {type(loss_fn).__name__!r}: fisher-monitor compares the Fisher "
            "and the empirical Fisher of a negative log-likelihood. Supported: "
            f"{SUPPORTED_LOSSES}."
        )
    reduction = loss_fn.reduction
    if reduction not in ("mean", "sum"):
        raise UnsupportedLossError(
            f"{type(loss_fn).__name__}(reduction={reduction!r}) is not supported: use "
            "reduction 'mean' or 'sum' (per-sample gradients are formed internally)."
        )
    if kind is LossKind.CROSS_ENTROPY:
        if loss_fn.weight is not None:
            raise UnsupportedLossError(
                "CrossEntropyLoss with class `weight` is not a negative log-likelihood of the "
                "categorical model, so its Fisher is undefined. Monitor an unweighted "
                "`CrossEntropyLoss()` via `loss_fn=`."
            )
        if loss_fn.label_smoothing != 0.0:
            raise UnsupportedLossError(
                f"CrossEntropyLoss(label_smoothing={loss_fn.label_smoothing!r}) is not the "
                "negative log-likelihood of the observed labels, so its empirical Fisher is not "
                "the one the paper studies. Monitor `CrossEntropyLoss()` via `loss_fn=`."
            )
        if loss_fn.ignore_index != -100:
            raise UnsupportedLossError(
                f"CrossEntropyLoss(ignore_index={loss_fn.ignore_index!r}) is not supported: "
                "ignored targets change the per-sample normalisation. Filter ignored samples "
                "out of the probe batch and monitor `CrossEntropyLoss()`."
            )
    if kind is LossKind.BCE_WITH_LOGITS and (
        loss_fn.weight is not None or loss_fn.pos_weight is not None
    ):
        raise UnsupportedLossError(
            "BCEWithLogitsLoss with `weight` or `pos_weight` is not a Bernoulli negative "
            "log-likelihood. Monitor `BCEWithLogitsLoss()` via `loss_fn=`."
        )
    return LossSpec(kind, reduction)
