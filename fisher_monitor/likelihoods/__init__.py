"""Supported losses, each read as a negative log-likelihood: one class per likelihood.

Adding a loss is adding a file with a :class:`Likelihood` subclass and a line in
:data:`LIKELIHOODS`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn
from torch.nn._reduction import legacy_get_string

from fisher_monitor.likelihoods.base import (
    LOSS_SIDE_DTYPE,
    Likelihood,
    LossSide,
    UnsupportedLossError,
    loss_side,
)
from fisher_monitor.likelihoods.bernoulli import Bernoulli
from fisher_monitor.likelihoods.categorical import Categorical, ClassLabels, complement_basis
from fisher_monitor.likelihoods.gaussian import Gaussian
from fisher_monitor.likelihoods.nll import CategoricalLogProbs
from fisher_monitor.likelihoods.sketched import SketchedLikelihood, rademacher

#: Every supported likelihood, by its short name.
LIKELIHOODS: dict[str, type[Likelihood]] = {
    cls.name: cls for cls in (Categorical, Gaussian, Bernoulli, CategoricalLogProbs)
}
#: The ``torch.nn.functional`` loss behind each supported loss module.
FUNCTIONAL_LOSSES: dict[str, type[nn.Module]] = {
    "cross_entropy": nn.CrossEntropyLoss,
    "nll_loss": nn.NLLLoss,
    "mse_loss": nn.MSELoss,
    "binary_cross_entropy_with_logits": nn.BCEWithLogitsLoss,
}
#: Names accepted by ``loss_fn=``: loss class names and short names.
SUPPORTED_LOSSES: tuple[str, ...] = tuple(
    cls.module_class.__name__ for cls in LIKELIHOODS.values()
) + tuple(LIKELIHOODS)


def resolve_loss(loss_fn: nn.Module | str | Likelihood) -> Likelihood:
    """Validate a loss module or name and return its :class:`Likelihood`.

    Args:
        loss_fn: A ``CrossEntropyLoss``, ``NLLLoss`` (on log-probabilities), ``MSELoss`` or
            ``BCEWithLogitsLoss`` instance, one of the names ``"cross_entropy"``, ``"nll"``,
            ``"mse"``, ``"bce_with_logits"`` (reduction ``"mean"``), or a
            :class:`Likelihood`.

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


def functional_loss_module(function: str, options: Mapping[str, Any]) -> nn.Module:
    """The loss module equivalent to a call of a ``torch.nn.functional`` loss.

    Args:
        function: Its name, e.g. ``"cross_entropy"`` (a key of :data:`FUNCTIONAL_LOSSES`).
        options: The call's keyword options (``reduction``, ``ignore_index``, ``weight``,
            ``label_smoothing``, ``pos_weight``, and the deprecated ``size_average`` and
            ``reduce``, which are turned into a reduction as PyTorch does).

    Returns:
        A fresh module, to pass to :func:`resolve_loss` (which checks its options).

    Raises:
        UnsupportedLossError: For a function that is not a supported likelihood.
    """
    module_class = FUNCTIONAL_LOSSES.get(function)
    if module_class is None:
        raise UnsupportedLossError(
            f"Unsupported loss function `F.{function}`: fisher-monitor compares the Fisher and "
            "the empirical Fisher of a negative log-likelihood. Supported: "
            f"{tuple('F.' + name for name in FUNCTIONAL_LOSSES)}."
        )
    options = dict(options)
    legacy = options.pop("size_average", None), options.pop("reduce", None)
    if legacy != (None, None):
        options["reduction"] = legacy_get_string(*legacy)
    accepted = inspect.signature(module_class).parameters
    return module_class(**{k: v for k, v in options.items() if k in accepted})


__all__ = [
    "LIKELIHOODS",
    "LOSS_SIDE_DTYPE",
    "SUPPORTED_LOSSES",
    "Bernoulli",
    "Categorical",
    "CategoricalLogProbs",
    "ClassLabels",
    "FUNCTIONAL_LOSSES",
    "Gaussian",
    "Likelihood",
    "LossSide",
    "SketchedLikelihood",
    "UnsupportedLossError",
    "complement_basis",
    "functional_loss_module",
    "loss_side",
    "rademacher",
    "resolve_loss",
]
