"""Additive statistics of a (F, EF) pair and the metrics derived from them.

Every structure (diagonal, block, Kronecker) reduces a layer to the same small set of
numbers: traces, Frobenius inner products, a Kullback-Leibler divergence, and inner
products of the damped solves ``A⁻¹g`` and ``B⁻¹g`` with ``A = F_S + λI`` and
``B = EF_S + λI``. These numbers *add up* over the layers of a block-diagonal matrix, so
the whole-network value (``all``) is their sum, never an average of per-layer metrics.
The metrics (defined on the theory page, ``docs/theory.md``) are functions of the sums
only; they live in :func:`finalize`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from fisher_monitor.keys import damping_suffix


@dataclass
class DampedStatistics:
    """The λ-dependent sums of one layer (or of several layers, once added).

    With ``A = F_S + λI``, ``B = EF_S + λI`` and the mean gradient ``g``:

    Attributes:
        damping_mass: ``Σ_b D_b λ_b``, so that ``damping_mass / D`` is the mean damping.
        kl: ``½[tr(B A⁻¹) − D + log det A − log det B]``.
        grad_sq: ``‖g‖²``.
        nat_sq: ``‖A⁻¹g‖²``.
        ef_sq: ``‖B⁻¹g‖²``.
        nat_ef: ``⟨A⁻¹g, B⁻¹g⟩``.
        nat_projection: ``gᵀA⁻¹g``.
        ef_projection: ``gᵀB⁻¹g``.
        ef_projection_per_sample: ``(1/N) Σ_n g_nᵀ B⁻¹ g_n = tr(B⁻¹ EF_S)``.
        grad_sq_error: How far rounding may have moved ``grad_sq`` where it is formed
            from a Gram matrix (``aᵀK_Ua``, ``bᵀK_Vb``): about ``ε √D max K_ii ‖a‖²``;
            0 where ``‖g‖²`` comes from ``g`` itself. Below it the gradient has vanished.
    """

    damping_mass: Tensor
    kl: Tensor
    grad_sq: Tensor
    nat_sq: Tensor
    ef_sq: Tensor
    nat_ef: Tensor
    nat_projection: Tensor
    ef_projection: Tensor
    ef_projection_per_sample: Tensor
    grad_sq_error: Tensor | float = 0.0

    def __add__(self, other: DampedStatistics) -> DampedStatistics:
        return DampedStatistics(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )


@dataclass
class LayerStatistics:
    """Additive statistics of ``F_S`` and ``EF_S`` on one layer (or a sum of layers).

    Attributes:
        dimension: Number of parameters ``D``.
        trace_f: ``tr F_S``.
        trace_ef: ``tr EF_S``.
        frob_f_sq: ``‖F_S‖²_F``.
        frob_ef_sq: ``‖EF_S‖²_F``.
        inner: ``⟨EF_S, F_S⟩_F``.
        frob_diff_sq: ``‖EF_S − F_S‖²_F``.
        damped: One :class:`DampedStatistics` per damping value, in the order given.
    """

    dimension: int
    trace_f: Tensor
    trace_ef: Tensor
    frob_f_sq: Tensor
    frob_ef_sq: Tensor
    inner: Tensor
    frob_diff_sq: Tensor
    damped: list[DampedStatistics] = field(default_factory=list)

    def __add__(self, other: LayerStatistics) -> LayerStatistics:
        if len(self.damped) != len(other.damped):
            raise ValueError("Cannot add statistics computed for different dampings.")
        return LayerStatistics(
            dimension=self.dimension + other.dimension,
            trace_f=self.trace_f + other.trace_f,
            trace_ef=self.trace_ef + other.trace_ef,
            frob_f_sq=self.frob_f_sq + other.frob_f_sq,
            frob_ef_sq=self.frob_ef_sq + other.frob_ef_sq,
            inner=self.inner + other.inner,
            frob_diff_sq=self.frob_diff_sq + other.frob_diff_sq,
            damped=[a + b for a, b in zip(self.damped, other.damped, strict=True)],
        )


def sum_statistics(statistics: Sequence[LayerStatistics]) -> LayerStatistics:
    """Add the statistics of several layers (the block-diagonal whole).

    Args:
        statistics: Per-layer statistics, all computed for the same dampings.

    Returns:
        Their sum.

    Raises:
        ValueError: If ``statistics`` is empty.
    """
    if not statistics:
        raise ValueError("Cannot sum an empty list of layer statistics.")
    total = statistics[0]
    for stat in statistics[1:]:
        total = total + stat
    return total


#: How far a cosine may leave [−1, 1] through rounding before it counts as a failure.
COSINE_TOLERANCE = 1e-6

#: Below ``‖g‖ ≤ GRADIENT_RESOLUTION·√tr EF`` the mean gradient is rounding noise of the
#: per-sample gradients it averages (an exact optimum, a full batch at convergence): its
#: direction is undefined and the gradient cosines are ``nan`` instead of noise.
GRADIENT_RESOLUTION = 1e-10


class NumericalError(FloatingPointError):
    """A metric left its mathematical range by more than rounding: the numbers are unreliable."""


def _ratio(numerator: float, denominator: float) -> float:
    if denominator == 0.0:
        return float("nan")
    return numerator / denominator


class _RangeCheck:
    """Clamp values that leave their range by rounding; fail on anything more."""

    def __init__(self, where: str, gradient_vanishes: bool = False):
        self.where = where
        self.gradient_vanishes = gradient_vanishes

    def fail(self, name: str, value: float, allowed: str) -> NumericalError:
        where = f" in {self.where}" if self.where else ""
        return NumericalError(
            f"Numerical failure{where}: {name} = {value!r} is outside its mathematical range "
            f"{allowed} by more than rounding, so this measurement is unreliable and is "
            "skipped. Increase the damping, measure in float64 (dtype=torch.float64), or "
            "report the case."
        )

    def cosine(self, name: str, inner: float, sq_a: float, sq_b: float, low: float = -1.0):
        if sq_a <= 0.0 or sq_b <= 0.0:
            return float("nan")
        if self.gradient_vanishes and name in GRADIENT_COSINES:
            return float("nan")
        value = inner / (sq_a**0.5 * sq_b**0.5)
        if math.isnan(value):
            return value
        if value > 1.0 + COSINE_TOLERANCE or value < low - COSINE_TOLERANCE:
            raise self.fail(name, value, f"[{low:g}, 1]")
        return min(1.0, max(low, value))

    def non_negative(self, name: str, value: float, scale: float) -> float:
        """``value ≥ 0`` up to rounding relative to ``scale`` (the size of its terms)."""
        if value < -(1e-8 * abs(scale) + 1e-12):
            raise self.fail(name, value, "[0, ∞)")
        return max(value, 0.0)


def finalize(
    statistics: LayerStatistics, dampings: Sequence[float], where: str = ""
) -> dict[str, float]:
    r"""Turn additive statistics into the metrics (the theory page, ``docs/theory.md``).

    With ``A = F_S + λI`` and ``B = EF_S + λI``:

    .. math::
        \mathrm{trace\_ratio} = \frac{\operatorname{tr} EF_S}{\operatorname{tr} F_S},\quad
        \mathrm{rel\_error} = \frac{\|EF_S - F_S\|_F}{\|F_S\|_F},\quad
        \mathrm{matrix\_cosine} = \frac{\langle EF_S, F_S\rangle_F}{\|EF_S\|_F \|F_S\|_F},

        \mathrm{kl} = \tfrac12[\operatorname{tr}(BA^{-1}) - D + \log\det A - \log\det B],\quad
        \mathrm{direction\_cosine} = \cos(A^{-1}g, B^{-1}g),

    ``nat_grad_cosine = cos(g, A⁻¹g)``, ``ef_grad_cosine = cos(g, B⁻¹g)``,
    ``nat_projection = gᵀA⁻¹g``, ``ef_projection = gᵀB⁻¹g``,
    ``ef_projection_per_sample = (1/N) Σ_n g_nᵀB⁻¹g_n``, ``dimension = D`` and
    ``damping`` the mean λ over the parameters (``Σ_b D_b λ_b / D``; for one layer, λ_b).

    A ratio whose denominator is zero (e.g. a layer with zero Fisher) is ``nan``, and so are
    the cosines of the gradient's direction where the mean gradient vanishes to rounding
    (``‖g‖ ≤`` :data:`GRADIENT_RESOLUTION` ``·√tr EF``, or ``‖g‖²`` within ten times its
    rounding error from a Gram matrix; e.g. at an exact optimum). Values
    that leave their mathematical range (cosines outside [−1, 1], negative KL divergences,
    squared norms or projections) by rounding only are clamped; by more, the measurement
    fails with :class:`NumericalError`, never reading as "EF equals F".

    Args:
        statistics: Summed statistics of a layer or of the whole network.
        dampings: The damping values the damped statistics were computed for (same
            order). With more than one, damped metric names get the suffix ``@{value}``.
        where: What the statistics describe (e.g. ``"block/fc1"``), for error messages.

    Returns:
        Mapping from metric name (with suffix where needed) to value.

    Raises:
        NumericalError: If a value is out of its range by more than rounding.
    """
    several = len(dampings) > 1
    values = _as_floats(statistics)
    check = _RangeCheck(where)
    values["dimension"] = float(statistics.dimension)
    check.gradient_vanishes = gradient_vanishes(values)
    out = {name: metric(values, check) for name, metric in UNDAMPED.items()}
    for damping, damped in zip(dampings, values["damped"], strict=True):
        suffix = damping_suffix(damping, several)
        both = {**values, **damped}
        for name, metric in DAMPED.items():
            out[f"{name}{suffix}"] = metric(both, check)
    return out


# ---------------------------------------------------------------------------- the metrics
# Each metric is a function of the summed statistics (undamped ones, or undamped and one
# damping's together) and the range check. Adding a metric that follows from the existing
# statistics is adding a function here and a line in UNDAMPED or DAMPED (plus its name and
# description in fisher_monitor.keys).

Values = dict
Metric = Callable[[Values, "_RangeCheck"], float]


def _frob_diff_sq(v: Values, check: _RangeCheck) -> float:
    return check.non_negative("‖EF − F‖²_F", v["frob_diff_sq"], v["frob_f_sq"] + v["frob_ef_sq"])


def _projection(name: str, squares: str) -> Metric:
    def metric(v: Values, check: _RangeCheck) -> float:
        if check.gradient_vanishes:  # g is rounding, and so is the sign of gᵀM⁻¹g
            return max(v[name], 0.0)
        scale = abs(v["grad_sq"] * v[squares]) ** 0.5  # Cauchy-Schwarz bound of |gᵀM⁻¹g|
        return check.non_negative(name, v[name], scale)

    return metric


def _kl(v: Values, check: _RangeCheck) -> float:
    # a difference of terms of size up to ~D: allow their rounding, not more
    return check.non_negative("kl", v["kl"], 100.0 * max(1.0, v["dimension"]))


#: Metrics that do not depend on λ, in key order.
UNDAMPED: dict[str, Metric] = {
    "trace_ratio": lambda v, check: _ratio(v["trace_ef"], v["trace_f"]),
    "rel_error": lambda v, check: _ratio(_frob_diff_sq(v, check) ** 0.5, v["frob_f_sq"] ** 0.5),
    "matrix_cosine": lambda v, check: check.cosine(
        "matrix_cosine", v["inner"], v["frob_ef_sq"], v["frob_f_sq"], low=0.0
    ),
    "dimension": lambda v, check: v["dimension"],
}
#: Metrics computed once per damping value (suffixed ``@λ`` with several), in key order.
DAMPED: dict[str, Metric] = {
    "kl": _kl,
    "direction_cosine": lambda v, check: check.cosine(
        "direction_cosine", v["nat_ef"], v["nat_sq"], v["ef_sq"]
    ),
    "nat_grad_cosine": lambda v, check: check.cosine(
        "nat_grad_cosine", v["nat_projection"], v["grad_sq"], v["nat_sq"]
    ),
    "ef_grad_cosine": lambda v, check: check.cosine(
        "ef_grad_cosine", v["ef_projection"], v["grad_sq"], v["ef_sq"]
    ),
    "nat_projection": _projection("nat_projection", "nat_sq"),
    "ef_projection": _projection("ef_projection", "ef_sq"),
    "ef_projection_per_sample": lambda v, check: check.non_negative(
        "ef_projection_per_sample", v["ef_projection_per_sample"], 1.0
    ),
    "damping": lambda v, check: _ratio(v["damping_mass"], v["dimension"]),
}


#: The cosines that depend on the direction of the mean gradient ``g``.
GRADIENT_COSINES = ("direction_cosine", "nat_grad_cosine", "ef_grad_cosine")


def gradient_vanishes(values: Values) -> bool:
    """Whether the mean gradient has vanished to rounding.

    That is ``‖g‖ ≤ GRADIENT_RESOLUTION·√tr EF``, or ``‖g‖²`` within ten times its rounding
    error (``grad_sq_error``, from a Gram matrix); ``values`` as :func:`finalize` reads
    them. ``‖g‖²`` is taken from the first damping's statistics (it does not depend on λ).
    On a network fitted to loss 2e-5 in float32, ``‖g‖²`` was 4e12–3e13 times that error.
    """
    if not values["damped"] or values["trace_ef"] <= 0.0:
        return False
    first = values["damped"][0]
    floor = max(GRADIENT_RESOLUTION**2 * values["trace_ef"], 10.0 * first["grad_sq_error"])
    return first["grad_sq"] <= floor


def _as_floats(statistics: LayerStatistics) -> dict:
    """Move every statistic to Python floats with a single device synchronisation."""
    undamped_names = ("trace_f", "trace_ef", "frob_f_sq", "frob_ef_sq", "inner", "frob_diff_sq")
    damped_names = [f.name for f in fields(DampedStatistics)]
    tensors = [torch.as_tensor(getattr(statistics, n), dtype=torch.float64) for n in undamped_names]
    for damped in statistics.damped:
        tensors += [torch.as_tensor(getattr(damped, n), dtype=torch.float64) for n in damped_names]
    device = tensors[0].device
    flat = torch.stack([t.detach().reshape(()).to(device) for t in tensors]).cpu().tolist()
    values: dict = dict(zip(undamped_names, flat[: len(undamped_names)], strict=True))
    rest = flat[len(undamped_names) :]
    values["damped"] = [
        dict(zip(damped_names, rest[i : i + len(damped_names)], strict=True))
        for i in range(0, len(rest), len(damped_names))
    ]
    return values
