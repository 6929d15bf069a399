"""What every likelihood provides: the per-sample negative log-likelihood and its loss side.

A supported loss is read as ``L = κ/N · Σ_n ℓ_n`` (reduction ``"mean"``) or ``L = κ Σ_n ℓ_n``
(reduction ``"sum"``), with ``ℓ_n = −log p(y_n | f_n)`` (up to constants) the negative
log-likelihood of sample ``n`` with all its output positions together. F and EF are always
built from this same ``ℓ_n`` (see the theory page, ``docs/theory.md``), so every ratio of
the two is independent of the reduction and of the number of positions.

The *loss side* of a measurement is everything that depends only on the network's outputs
``f_n`` and the targets ``y_n``, computed here in float64 whatever the network's precision:

- the residual ``r_n = ∇_f ℓ(f_n, y_n)`` at the observed label;
- a square root ``S_n`` of the loss Hessian, ``S_n S_nᵀ = ∇²_f ℓ_n`` (``K × R_n``, ``K`` the
  number of output entries per sample);
- the coefficients ``β_n`` with ``S_n β_n = r_n``, in closed form: every observed residual
  lies in the range of the Hessian for these likelihoods, so the per-sample gradients are
  exact combinations of the Fisher's square-root columns (``U = VB``) by construction;
- residuals at labels drawn from the model, ``∇_f ℓ(f_n, ŷ_m)/√M`` (Monte-Carlo Fisher).

Once ``p(y|f) → 1`` (a fitted network) a residual such as ``p_y − 1`` loses its digits in
float32, leaves the range of ``S_n`` and is then amplified by ``(F + λI)⁻¹``; float64 and
the closed forms keep the metrics of fitted float32 networks right.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

#: Floating-point type of every loss-side quantity.
LOSS_SIDE_DTYPE = torch.float64
#: The note of a measurement whose exact Fisher could not use the closed-form coefficients.
SATURATED_NOTE = (
    "exact Fisher: some predicted probabilities are so saturated that the Fisher's square "
    "root underflows in float64; the per-sample gradients come from the observed residuals "
    "instead of the closed-form coefficients"
)


class UnsupportedLossError(ValueError):
    """The loss cannot be read as a supported negative log-likelihood."""


class Likelihood(ABC):
    """A negative log-likelihood ``ℓ_n`` behind a PyTorch loss module.

    Subclasses state their distribution, validate the loss module's options and targets,
    and give the loss side in closed form. Every method takes a batch (leading dimension
    ``N``) and is written without data-dependent control flow, so that the ``torch.func``
    backend can call it under ``vmap`` on a batch of one.

    Args:
        reduction: ``"mean"`` or ``"sum"`` (the loss module's reduction).
    """

    #: The loss module class, e.g. ``nn.CrossEntropyLoss``.
    module_class: ClassVar[type[nn.Module]]
    #: The short name accepted in place of a module, e.g. ``"cross_entropy"``.
    name: ClassVar[str]

    def __init__(self, reduction: str = "mean"):
        if reduction not in ("mean", "sum"):
            raise UnsupportedLossError(
                f"{self.module_class.__name__}(reduction={reduction!r}) is not supported: use "
                "reduction 'mean' or 'sum' (per-sample gradients are formed internally)."
            )
        self.reduction = reduction

    def options(self) -> dict[str, Any]:
        """The loss module's options besides the reduction, e.g. ``{"ignore_index": -100}``."""
        return {}

    def __repr__(self) -> str:
        options = "".join(f", {name}={value!r}" for name, value in self.options().items())
        return f"{type(self).__name__}(reduction={self.reduction!r}{options})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return False
        assert isinstance(other, Likelihood)
        return other.reduction == self.reduction and other.options() == self.options()

    def __hash__(self) -> int:
        return hash((type(self), self.reduction, tuple(self.options().items())))

    @property
    def loss_name(self) -> str:
        """Class name of the loss module, e.g. ``"CrossEntropyLoss"``."""
        return self.module_class.__name__

    @classmethod
    def from_module(cls, module: nn.Module) -> Likelihood:
        """Validate a loss module of :attr:`module_class` and return its likelihood.

        Raises:
            UnsupportedLossError: For options that break the likelihood reading.
        """
        return cls(module.reduction)

    def make_module(self) -> nn.Module:
        """A fresh loss module with this reduction and options (never the caller's own)."""
        return self.module_class(reduction=self.reduction, **self.options())

    # ------------------------------------------------------------------ shapes and checks

    @abstractmethod
    def check_batch(self, outputs: Tensor, targets: Tensor) -> None:
        """Check that outputs and targets fit this likelihood.

        Raises:
            ValueError: With a message that names both shapes and the fix.
        """

    def output_mask(self, targets: Tensor, sample_shape: Sequence[int]) -> Tensor | None:
        """Which output entries enter ``ℓ_n``: ``(N, K)``, 1 where they do, 0 where not.

        ``None`` (the default) when every entry does. A likelihood with ignored targets
        (``ignore_index``) drops the positions of those targets: :func:`loss_side` zeroes
        their rows in the Fisher's columns (exact, sampled or sketched), so that F and EF
        are built from the same ``ℓ_n``; :meth:`residuals` and :meth:`coefficients` zero
        them themselves. Written without data-dependent control flow (``vmap``).

        Args:
            targets: ``(N, …)`` targets.
            sample_shape: Shape of one sample's output.
        """
        return None

    def fisher_columns(self, sample_shape: Sequence[int]) -> int:
        """``R_n``: columns of the exact Hessian square root of one sample.

        Args:
            sample_shape: Shape of one sample's output (without the batch dimension).
        """
        return _numel(sample_shape)

    # ------------------------------------------------------------------ the loss side

    @abstractmethod
    def residuals(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``r_n = ∇_f ℓ(f_n, y_n)``, shaped ``(N, K)`` (outputs flattened per sample)."""

    @abstractmethod
    def sqrt_hessian(self, outputs: Tensor) -> Tensor:
        """``S_n`` with ``S_n S_nᵀ = ∇²_f ℓ_n``, shaped ``(N, K, R_n)``."""

    @abstractmethod
    def coefficients(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``β_n`` with ``S_n β_n = r_n`` in closed form, shaped ``(N, R_n)``."""

    @abstractmethod
    def draw_noise(self, outputs: Tensor, samples: int) -> Tensor:
        """Noise for :meth:`sampled_residuals`, ``(N, M, *sample_shape)``, from the global RNG."""

    @abstractmethod
    def sampled_residuals(self, outputs: Tensor, noise: Tensor) -> Tensor:
        """``∇_f ℓ(f_n, ŷ_m)/√M`` for ``M`` labels drawn from the model: ``(N, K, M)``.

        The labels are a deterministic function of the pre-drawn ``noise``, so that the
        draw is reproducible and free of in-transform randomness.
        """

    # ------------------------------------------------------------------ sketches

    def sketch_sign_shape(self, outputs: Tensor, columns: int) -> tuple[int, ...]:
        """Shape of the Rademacher signs :meth:`sketch_columns` takes for ``k`` columns.

        ``(N, k, R_n)`` by default (one sign per column of ``S_n``); a likelihood with a
        closed-form sketch takes signs in its output coordinates, ``(N, k, *sample_shape)``.
        """
        return (outputs.shape[0], columns, self.fisher_columns(outputs.shape[1:]))

    def sketch_columns(self, outputs: Tensor, signs: Tensor) -> Tensor:
        """``S_n w_{n,j}/√k`` for Rademacher signs ``w``: ``(N, K, k)``, ``E[ssᵀ] = H_n``.

        The default forms ``S_n`` (:meth:`sqrt_hessian`) and combines its columns;
        subclasses with a closed form override it (see
        :mod:`~fisher_monitor.likelihoods.sketched` for the estimator).

        Args:
            outputs: ``(N, *sample_shape)`` network outputs (float64).
            signs: Signs of the shape :meth:`sketch_sign_shape` gives.
        """
        roots = self.sqrt_hessian(outputs)  # (N, K, R_n)
        return torch.einsum("nkr,njr->nkj", roots, signs) * signs.shape[1] ** -0.5

    def hessian_product(self, outputs: Tensor, vectors: Tensor) -> Tensor:
        """``H_n u_n`` per sample, the loss-Hessian ``∇²_f ℓ_n`` applied in output space.

        The matrix-free Fisher-vector products (``F v = (1/N) Σ_n J_nᵀ H_n J_n v``) apply it
        between a forward-mode and a reverse-mode pass, under ``vmap``. The default forms
        ``S_n`` (:meth:`sqrt_hessian`) and applies ``S_n S_nᵀ``; subclasses with a closed
        form override it.

        Args:
            outputs: ``(N, *sample_shape)`` network outputs (float64).
            vectors: ``u``, shaped like ``outputs``.

        Returns:
            ``H u``, shaped like ``outputs``.
        """
        roots = self.sqrt_hessian(outputs)  # (N, K, R_n)
        flat = vectors.reshape(vectors.shape[0], -1)
        projected = torch.einsum("nkr,nk->nr", roots, flat)
        return torch.einsum("nkr,nr->nk", roots, projected).reshape(vectors.shape)


@dataclass
class LossSide:
    """The loss side of one measurement (float64), ready to be backpropagated.

    The backends push ``columns`` (divided by ``√N``) back through the network: the first
    :attr:`fisher_columns` become the square-root factor ``V`` of the Fisher, ``F = VVᵀ``.
    The per-sample gradients (``U``, ``EF = UUᵀ``) are ``V`` combined with
    :attr:`coefficients` (exact Fisher), or the last column (Monte-Carlo Fisher, which
    carries the observed residual along).

    Attributes:
        columns: ``(N, K, R)`` columns per sample.
        fisher_columns: ``R_n``, the columns that belong to ``V``.
        coefficients: ``(N, R_n)`` ``β`` with ``U = VB`` (exact Fisher), else ``None``.
        sample_shape: Shape of one sample's output.
    """

    columns: Tensor
    fisher_columns: int
    coefficients: Tensor | None
    sample_shape: tuple[int, ...]

    @property
    def observed_column(self) -> bool:
        """Whether the last column is the observed residual (Monte-Carlo Fisher)."""
        return self.coefficients is None

    def for_backpack(self, dtype: torch.dtype) -> Tensor:
        """What BackPACK backpropagates: ``(R, N, *sample_shape)``, divided by ``√N``."""
        n, _, r = self.columns.shape
        scaled = self.columns / n**0.5
        return scaled.permute(2, 0, 1).reshape(r, n, *self.sample_shape).to(dtype)


def loss_side(
    likelihood: Likelihood,
    outputs: Tensor,
    targets: Tensor,
    exact: bool,
    noise: Tensor | None = None,
    observed: bool | None = None,
) -> LossSide:
    """Compute the loss side in float64 from the network's outputs.

    Args:
        likelihood: The likelihood.
        outputs: ``(N, *sample_shape)`` network outputs (any floating type).
        targets: Targets.
        exact: Exact Fisher (Hessian square roots and coefficients) or sampled labels.
        noise: For the Monte-Carlo Fisher, from :meth:`Likelihood.draw_noise`.
        observed: Exact Fisher only: carry the observed residual as a last column instead
            of the closed-form coefficients. ``None`` decides from the coefficients: when
            one is not finite (a probability so saturated that ``S_n`` underflows in float64,
            e.g. a logit beyond ±1400), ``U = VB`` cannot be formed and the observed
            residual is used. Pass a bool under ``vmap``, where no such decision is possible.

    Returns:
        The loss side.
    """
    outputs = outputs.detach().to(LOSS_SIDE_DTYPE)
    sample_shape = tuple(outputs.shape[1:])
    mask = likelihood.output_mask(targets, sample_shape)
    if exact:
        roots = _masked(likelihood.sqrt_hessian(outputs), mask)
        beta = likelihood.coefficients(outputs, targets)
        if observed is None:
            observed = not bool(torch.isfinite(beta).all())
        if not observed:
            return LossSide(roots, roots.shape[2], beta, sample_shape)
        columns = roots
    else:
        if noise is None:
            raise ValueError("The Monte-Carlo Fisher needs noise from draw_noise().")
        columns = _masked(likelihood.sampled_residuals(outputs, noise.to(LOSS_SIDE_DTYPE)), mask)
    residual = likelihood.residuals(outputs, targets).unsqueeze(2)
    return LossSide(torch.cat([columns, residual], dim=2), columns.shape[2], None, sample_shape)


def coefficients_are_finite(likelihood: Likelihood, outputs: Tensor, targets: Tensor) -> bool:
    """Whether the closed-form coefficients of every sample are finite (see :func:`loss_side`)."""
    outputs = outputs.detach().to(LOSS_SIDE_DTYPE)
    return bool(torch.isfinite(likelihood.coefficients(outputs, targets)).all())


def _masked(columns: Tensor, mask: Tensor | None) -> Tensor:
    """``(N, K, R)`` columns with the rows of ignored output entries zeroed."""
    return columns if mask is None else columns * mask.to(columns.dtype).unsqueeze(2)


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def one_hot(
    labels: Tensor, classes: int, dim: int = 1, dtype: torch.dtype = LOSS_SIDE_DTYPE
) -> Tensor:
    """One-hot encoding with the class axis at ``dim`` (arithmetic only: works under ``vmap``)."""
    shape = [1] * (labels.dim() + 1)
    shape[dim] = classes
    arange = torch.arange(classes, device=labels.device).reshape(shape)
    return (labels.unsqueeze(dim) == arange).to(dtype)
