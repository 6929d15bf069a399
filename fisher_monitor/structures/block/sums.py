"""What every route of the ``block`` structure returns, and how it assembles it.

A route (:mod:`~.dense_route`, :mod:`~.root_route`, :mod:`~.gram_route`) reduces a layer to
:class:`~fisher_monitor.metrics.LayerStatistics` plus a rounding estimate
(:class:`~fisher_monitor.structures.base.NumericalHealth`) and the EF-side solves it used,
which the ``kron`` structure reuses on the same layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fisher_monitor.metrics import DampedStatistics, LayerStatistics
from fisher_monitor.structures.base import NumericalHealth
from fisher_monitor.structures.empirical import EmpiricalSolve


@dataclass
class BlockStatistics:
    """A block's statistics, how reliable they are, and the shared EF-side solves.

    Attributes:
        statistics: The additive statistics (as :func:`~.gram_route.lowrank_statistics`
            returns them).
        health: The rounding estimate.
        empirical: One :class:`EmpiricalSolve` per damping, reusable by
            :func:`~fisher_monitor.structures.kron.statistics.kronecker_statistics`
            (same ``U``).
        natural: Where ``U = VB``, per damping ``c₀ = (λI + K_V)⁻¹Ba`` with
            ``A⁻¹g = Vc₀`` (the directions then need no second factorisation); else ``None``.
    """

    statistics: LayerStatistics
    health: NumericalHealth
    empirical: list[EmpiricalSolve]
    natural: list[Tensor] | None = None


def as_dense(coefficients) -> Tensor:
    """``B`` as a tensor: a block-sparse ``CoefficientMatrix`` is formed, a dense one passes.

    The Gram paths concatenate ``B`` with other right-hand sides; they hold ``R × R``
    matrices, larger than ``B``, anyway.
    """
    return coefficients.dense() if hasattr(coefficients, "dense") else coefficients


def assemble_undamped(
    dimension: int,
    trace_f: Tensor,
    trace_ef: Tensor,
    frob_f_sq: Tensor,
    frob_ef_sq: Tensor,
    inner: Tensor,
) -> dict:
    """The undamped statistics as keyword arguments of ``LayerStatistics``.

    ``‖EF − F‖²_F = ‖EF‖² + ‖F‖² − 2⟨EF, F⟩``, clamped at 0 (it is a squared norm).
    """
    return dict(
        dimension=dimension,
        trace_f=trace_f,
        trace_ef=trace_ef,
        frob_f_sq=frob_f_sq,
        frob_ef_sq=frob_ef_sq,
        inner=inner,
        frob_diff_sq=(frob_ef_sq + frob_f_sq - 2.0 * inner).clamp_min(0.0),
    )


def assemble_damped(
    damping: float,
    dimension: int,
    kl: Tensor,
    grad_sq: Tensor,
    nat_sq: Tensor,
    nat_ef: Tensor,
    nat_projection: Tensor,
    ef: EmpiricalSolve,
) -> DampedStatistics:
    """One damping's statistics of a route, with the EF side from its shared solve."""
    return DampedStatistics(
        damping_mass=torch.as_tensor(damping * dimension, dtype=kl.dtype, device=kl.device),
        kl=kl,
        grad_sq=grad_sq,
        nat_sq=nat_sq.clamp_min(0.0),
        ef_sq=ef.ef_sq,
        nat_ef=nat_ef,
        nat_projection=nat_projection,
        ef_projection=ef.ef_projection,
        ef_projection_per_sample=ef.per_sample,
    )


def worst_error(errors: list[Tensor], like: Tensor) -> Tensor:
    """The largest of the routes' relative error estimates (0 when there are none)."""
    if not errors:
        return torch.zeros((), dtype=like.dtype, device=like.device)
    return torch.stack(errors).max()


__all__ = ["BlockStatistics", "as_dense", "assemble_damped", "assemble_undamped", "worst_error"]
