"""Per-layer factors of F and EF, one module per representation (see :mod:`.base`)."""

from fisher_monitor.factors.base import (
    CoefficientMatrix,
    ColumnSplit,
    KroneckerFactors,
    LayerFactors,
    OuterSamples,
    augment,
    to_parameter_order,
)
from fisher_monitor.factors.forms import FORMS, form_of
from fisher_monitor.factors.grouped import GroupedFactors
from fisher_monitor.factors.materialized import MaterializedFactors
from fisher_monitor.factors.outer_product import OuterProductFactors
from fisher_monitor.factors.shape import CURVATURE_BYTES, RATES, LayerShape, PassSize, Rates
from fisher_monitor.factors.weight_sharing import WeightSharingFactors

__all__ = [
    "CURVATURE_BYTES",
    "RATES",
    "Rates",
    "FORMS",
    "LayerShape",
    "PassSize",
    "form_of",
    "CoefficientMatrix",
    "ColumnSplit",
    "GroupedFactors",
    "KroneckerFactors",
    "LayerFactors",
    "MaterializedFactors",
    "OuterProductFactors",
    "OuterSamples",
    "WeightSharingFactors",
    "augment",
    "to_parameter_order",
]
