"""Supported losses, each read as a negative log-likelihood: one class per likelihood.

Adding a loss is adding a file with a :class:`Likelihood` subclass and a line in
:data:`LIKELIHOODS`.
"""

from __future__ import annotations

from torch import nn

from fisher_monitor.likelihoods.base import (
    LOSS_SIDE_DTYPE,
    Likelihood,
    LossSide,
    UnsupportedLossError,
    loss_side,
)
from fisher_monitor.likelihoods.bernoulli import Bernoulli
from fisher_monitor.likelihoods.categorical import Categorical, complement_basis
from fisher_monitor.likelihoods.gaussian import Gaussian
from fisher_monitor.likelihoods.sketched import SketchedLikelihood, rademacher

#: Every supported likelihood, by its short name.
LIKELIHOODS: dict[str, type[Likelihood]] = {
    cls.name: cls for cls in (Categorical, Gaussian, Bernoulli)
}
#: Names accepted by ``loss_fn=``: loss class names and short names.
SUPPORTED_LOSSES: tuple[str, ...] = tuple(
    cls.module_class.__name__ for cls in LIKELIHOODS.values()
) + tuple(LIKELIHOODS)


def resolve_loss(loss_fn: nn.Module | str | Likelihood) -> Likelihood:
    """Validate a loss module or name and return its :class:`Likelihood`.

    Args:
        loss_fn: A ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss`` instance, one
            of the names ``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"`` (reduction
            ``"mean"``), or a :class:`Likelihood`.

    Returns:
        The likelihood.

    Raises:
        UnsupportedLossError: For any other loss or an option that breaks the
            negative-log-likelihood reading.
    """
    if isinstance(loss_fn, Likelihood):
        return loss_fn
    if isinstance(loss_fn, str):
        cls = LIKELIHOODS.get(loss_fn)
        if cls is None:
            raise UnsupportedLossError(
                f"Unknown loss name {loss_fn!r}. Supported: {tuple(LIKELIHOODS)}."
            )
        return cls("mean")
    cls = next((c for c in LIKELIHOODS.values() if type(loss_fn) is c.module_class), None)
    if cls is None:
        raise UnsupportedLossError(
            f"Unsupported loss {type(loss_fn).__name__!r}: fisher-monitor compares the Fisher "
            "and the empirical Fisher of a negative log-likelihood. Supported: "
            f"{SUPPORTED_LOSSES}."
        )
    if loss_fn.reduction not in ("mean", "sum"):
        raise UnsupportedLossError(
            f"{type(loss_fn).__name__}(reduction={loss_fn.reduction!r}) is not supported: use "
            "reduction 'mean' or 'sum' (per-sample gradients are formed internally)."
        )
    return cls.from_module(loss_fn)


__all__ = [
    "LIKELIHOODS",
    "LOSS_SIDE_DTYPE",
    "SUPPORTED_LOSSES",
    "Bernoulli",
    "Categorical",
    "Gaussian",
    "Likelihood",
    "LossSide",
    "SketchedLikelihood",
    "UnsupportedLossError",
    "complement_basis",
    "loss_side",
    "rademacher",
    "resolve_loss",
]
