"""Per-layer factors of F and EF for one probe batch (BackPACK, or torch.func as a fallback).

The only code that imports BackPACK or uses ``torch.func`` transforms on the model.
"""

from fisher_monitor.curvature.factors import (
    KroneckerFactors,
    LayerFactors,
    MaterializedFactors,
    OuterProductFactors,
    WeightSharingFactors,
)
from fisher_monitor.curvature.functorch_backend import FunctorchNetwork
from fisher_monitor.curvature.losses import LossKind, LossSpec, UnsupportedLossError, resolve_loss
from fisher_monitor.curvature.network import (
    LayerInfo,
    PreparedNetwork,
    ShadowNetwork,
    find_layers,
)

__all__ = [
    "FunctorchNetwork",
    "KroneckerFactors",
    "LayerFactors",
    "LayerInfo",
    "LossKind",
    "LossSpec",
    "MaterializedFactors",
    "OuterProductFactors",
    "PreparedNetwork",
    "ShadowNetwork",
    "UnsupportedLossError",
    "WeightSharingFactors",
    "find_layers",
    "resolve_loss",
]
