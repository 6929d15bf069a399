"""The Gram route in mixed precision: ``K_V`` formed and factorised in float32 where safe.

For the exact Fisher's coefficient path (:mod:`~.factored`) on a layer whose factors can
form ``K_V`` in float32 and multiply by it in float64 (``LayerFactors.mixed_precision``),
with at least :data:`MIXED_MIN_COLUMNS` Fisher columns (below, the factorisation is cheap in
float64 anyway): ``K_V`` is formed in float32 into the measurement's workspace and
factorised there, ``K_U`` and ``K_UV`` are formed in float64 (``N × N`` and ``N × R``), the
solves are refined in float64, and the rounding estimate decides (:data:`~.factored.
MIXED_TOLERANCE`). A layer refused in float32 is redone in float64 by the caller, and the
workspace remembers it: the next :data:`RETRY_AFTER` measurements of that layer go to
float64 directly.
"""

from __future__ import annotations

import torch

from fisher_monitor.factors import LayerFactors
from fisher_monitor.linalg import current_workspace, relative, square_norm
from fisher_monitor.metrics import LayerStatistics
from fisher_monitor.structures.base import LayerInput, NumericalHealth
from fisher_monitor.structures.block.factored import (
    MIXED_TOLERANCE,
    factored_statistics,
    frobenius_error,
)
from fisher_monitor.structures.block.sums import BlockStatistics, assemble_undamped, worst_error
from fisher_monitor.structures.empirical import empirical_solves, mean_weights

#: Fisher columns from which the Gram route tries float32 (an ``R × R`` factorisation of
#: ``R = 256`` takes about a millisecond in float64).
MIXED_MIN_COLUMNS = 256
#: After a layer's float32 factorisation is refused, this many measurements of it go to
#: float64 directly before float32 is tried again.
RETRY_AFTER = 8
#: The float32 factorisations may be switched off (``False``) for comparisons.
ENABLED = True


def mixed_precision_applies(layer: LayerInput, factors: LayerFactors) -> bool:
    """Whether the layer's Gram route tries float32 (see the module docstring)."""
    from fisher_monitor.structures.block.gram_route import SPECTRAL_MIN_DAMPINGS

    return (
        ENABLED
        and factors.mixed_precision
        and factors.dtype == torch.float64
        and factors.coefficient_matrix() is not None
        and factors.num_columns >= MIXED_MIN_COLUMNS
        and len(layer.dampings) < SPECTRAL_MIN_DAMPINGS
    )


def mixed_gram_statistics(layer: LayerInput, factors: LayerFactors) -> BlockStatistics | None:
    """The layer's statistics with ``K_V`` in float32, or ``None`` (then float64 it is)."""
    if not mixed_precision_applies(layer, factors):
        return None
    workspace = current_workspace()
    refused = workspace.memory.setdefault("float32 refused", {})
    name = layer.info.name
    if refused.get(name, 0) > 0:
        refused[name] -= 1
        return None
    result = _attempt(layer, factors, workspace)
    if result is None:
        refused[name] = RETRY_AFTER
    return result


def _attempt(layer: LayerInput, factors: LayerFactors, workspace) -> BlockStatistics | None:
    r = factors.num_columns
    coefficients = factors.coefficient_matrix()
    device = factors.coefficients.device
    gram_v = factors.gram_v_in(
        torch.float32, workspace.take("gram-v", (r, r), torch.float32, device)
    )
    # K_U formed directly (not as BᵀK_VB from a float32 K_V); cached on the layer only if
    # float32 is kept, so that a refused layer's float64 route is the plain float64 one
    gram_u, gram_uv = factors.gram_u(), factors.gram_uv()
    diagonal = factors.gram_v_diagonal()
    length = factors.gram_length()
    empirical = empirical_solves(gram_u, layer.dampings, layer.info.dimension)
    factored = factored_statistics(
        gram_v,
        gram_uv,
        coefficients,
        factors.dimension,
        layer.dampings,
        empirical,
        diagonal=diagonal,
        length=length,
        product=factors.gram_v_product,
        workspace=workspace,
    )
    if factored is None:
        return None
    frob_f_sq = square_norm(gram_v)
    undamped = assemble_undamped(
        factors.dimension,
        diagonal.sum(),
        torch.diagonal(gram_u).sum(),
        frob_f_sq,
        square_norm(gram_u),
        square_norm(gram_uv),
    )
    frob_error = frobenius_error(gram_v, diagonal, length)
    if bool(relative(frob_error, undamped["frob_diff_sq"]) > MIXED_TOLERANCE):
        return None
    # ‖g‖² = bᵀK_Vb from float64 Grams: their resolution
    n = gram_uv.shape[0]
    b = coefficients @ mean_weights(n, gram_uv)
    grad_sq_error = torch.finfo(torch.float64).eps * length**0.5 * diagonal.max() * (b @ b)
    for statistics in factored.damped:
        statistics.grad_sq_error = grad_sq_error
    errors = factored.errors + [
        ef.relative_error for ef in empirical if ef.relative_error is not None
    ]
    layer.cached("gram_u", lambda: gram_u)
    layer.cached("gram_uv", lambda: gram_uv)  # the directions' (structure.py)
    layer.cached("empirical", lambda: empirical)
    return BlockStatistics(
        statistics=LayerStatistics(**undamped, damped=factored.damped),
        health=NumericalHealth("gram-float32", worst_error(errors, gram_uv)),
        empirical=list(empirical),
        natural=factored.natural,
    )


__all__ = ["MIXED_MIN_COLUMNS", "RETRY_AFTER", "mixed_gram_statistics", "mixed_precision_applies"]
