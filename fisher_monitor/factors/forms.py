"""The factor representations by the name the backends give them (``LayerShape.form``)."""

from __future__ import annotations

from fisher_monitor.factors.base import LayerFactors
from fisher_monitor.factors.materialized import MaterializedFactors
from fisher_monitor.factors.outer_product import OuterProductFactors
from fisher_monitor.factors.shape import LayerShape
from fisher_monitor.factors.weight_sharing import WeightSharingFactors

#: Each form of :data:`~fisher_monitor.backends.base.FACTOR_FORMS` and its representation.
FORMS: dict[str, type[LayerFactors]] = {
    "outer": OuterProductFactors,
    "shared": WeightSharingFactors,
    "materialised": MaterializedFactors,
}


def form_of(shape: LayerShape) -> type[LayerFactors]:
    """The representation a layer of this shape gets (it answers the layer's costs).

    Raises:
        ValueError: For a form no representation is registered for.
    """
    try:
        return FORMS[shape.form]
    except KeyError:
        raise ValueError(
            f"Invalid factor form: {shape.form!r}. Supported: {tuple(FORMS)}."
        ) from None


__all__ = ["FORMS", "form_of"]
