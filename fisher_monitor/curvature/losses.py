"""Transitional re-exports (removed once every caller imports fisher_monitor.likelihoods)."""

from fisher_monitor.likelihoods import (
    SUPPORTED_LOSSES,
    Likelihood,
    UnsupportedLossError,
    complement_basis,
    resolve_loss,
)

LossSpec = Likelihood

__all__ = [
    "SUPPORTED_LOSSES",
    "LossSpec",
    "UnsupportedLossError",
    "complement_basis",
    "resolve_loss",
]
