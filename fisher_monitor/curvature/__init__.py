"""The only code that imports BackPACK: per-layer factors of F and EF for one probe batch."""

from fisher_monitor.curvature.factors import (
    KroneckerFactors,
    LayerFactors,
    MaterializedFactors,
    OuterProductFactors,
    WeightSharingFactors,
)
from fisher_monitor.curvature.losses import LossKind, LossSpec, UnsupportedLossError, resolve_loss
from fisher_monitor.curvature.network import LayerInfo, PreparedNetwork, find_layers

__all__ = [
    "KroneckerFactors",
    "LayerFactors",
    "LayerInfo",
    "LossKind",
    "LossSpec",
    "MaterializedFactors",
    "OuterProductFactors",
    "PreparedNetwork",
    "UnsupportedLossError",
    "WeightSharingFactors",
    "find_layers",
    "resolve_loss",
]
