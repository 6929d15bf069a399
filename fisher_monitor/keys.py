"""Names that are API: structures, metrics, and the key format shared by every part.

This module imports nothing but the standard library, so that the report, the command
line and the tests can use it without loading torch. Every key the engine returns, the
callback logs (after a prefix) and the report reads is built and parsed here:

- ``"{structure}/{metric}{suffix}/{layer}"``, e.g. ``"block/direction_cosine/fc1"`` or
  ``"diag/kl@0.001/all"`` (the suffix ``@{λ}`` only when several dampings are measured);
- ``"{structure}/{metric}_se{suffix}/{layer}"``: the standard error of an estimated metric;
- ``"optimizer/{metric}/{layer}"``: the preconditioner audit of the user's optimizer;
- ``"probe/{name}"``: scalars about the measurement itself (loss, batch size, time).

The definitions of the metrics are in the documentation's theory page; one-line
descriptions for dashboards are in :data:`DESCRIPTIONS`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

#: Key of the whole network (a block-diagonal or diagonal matrix over all layers).
ALL = "all"
#: Group of the scalars that describe the probe rather than a structure.
PROBE = "probe"
#: Group of the optimizer-preconditioner audit (not per structure).
OPTIMIZER = "optimizer"
#: Suffix of a metric name for its standard error (estimated metrics only).
STDERR_SUFFIX = "_se"

#: The built-in restrictions of F and EF, in the order reports list them (others are
#: added with :func:`register_structure`, see :func:`registered_structures`).
STRUCTURES: tuple[str, ...] = ("diag", "block", "kron")
_REGISTERED: list[str] = list(STRUCTURES)
_STRUCTURE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
#: When several structures are measured, the one verdicts and the heat map use.
PRIMARY_ORDER: tuple[str, ...] = ("block", "kron", "diag")

#: Metrics of F against EF, per structure, in the order reports list them.
METRICS: tuple[str, ...] = (
    "trace_ratio",
    "rel_error",
    "matrix_cosine",
    "kl",
    "direction_cosine",
    "nat_grad_cosine",
    "ef_grad_cosine",
    "nat_projection",
    "ef_projection",
    "ef_projection_per_sample",
    "dimension",
    "damping",
)
#: Step audit: the update the optimizer applied against the natural-gradient step, the
#: EF-preconditioned step and the negative gradient (per structure, when an update is given).
UPDATE_METRICS: tuple[str, ...] = (
    "update_nat_cosine",
    "update_ef_cosine",
    "update_grad_cosine",
)
#: Preconditioner audit of optimizers with a second moment (``optimizer/{metric}/{layer}``).
OPTIMIZER_METRICS: tuple[str, ...] = (
    "preconditioner_fisher_cosine",
    "preconditioner_ef_cosine",
)
#: Metrics that depend on the damping λ (suffixed ``@λ`` with several dampings).
DAMPED_METRICS: tuple[str, ...] = (
    "kl",
    "direction_cosine",
    "nat_grad_cosine",
    "ef_grad_cosine",
    "nat_projection",
    "ef_projection",
    "ef_projection_per_sample",
    "damping",
    "update_nat_cosine",
    "update_ef_cosine",
)
#: Metrics of :data:`METRICS` that do not depend on λ.
UNDAMPED_METRICS: tuple[str, ...] = tuple(m for m in METRICS if m not in DAMPED_METRICS)
#: Metrics that are cosines (range [−1, 1]).
COSINE_METRICS: tuple[str, ...] = (
    "matrix_cosine",
    "direction_cosine",
    "nat_grad_cosine",
    "ef_grad_cosine",
    *UPDATE_METRICS,
    *OPTIMIZER_METRICS,
)
#: Metrics that stay constant during a run (settings, not time series).
CONSTANT_METRICS: tuple[str, ...] = ("dimension",)

#: One line per metric: what it means and its good range (TensorBoard descriptions,
#: report tables, ``Measurement.table()``).
DESCRIPTIONS: dict[str, str] = {
    "trace_ratio": "tr EF / tr F: overall scale of the EF against the Fisher; 1 is a match, "
    "far from 1 (e.g. < 0.5 or > 2) means the EF mis-scales curvature.",
    "rel_error": "‖EF − F‖_F / ‖F‖_F: relative error of the EF as a matrix; near 0 is good, "
    "≥ 0.5 means the EF is not a usable stand-in.",
    "matrix_cosine": "⟨EF, F⟩_F / (‖EF‖_F ‖F‖_F): alignment of the two matrices regardless of "
    "scale; 1 is perfect, below 0.9 they disagree in shape.",
    "kl": "KL divergence (nats) between the Laplace Gaussians with precisions F + λI and "
    "EF + λI; 0 is identical, large values mean EF-based uncertainties are wrong.",
    "direction_cosine": "cos(F̃⁻¹g, ẼF⁻¹g): natural gradient against the EF-preconditioned "
    "step; 1 is the same direction, below 0.5 EF preconditioning points elsewhere.",
    "nat_grad_cosine": "cos(g, F̃⁻¹g): how far the natural gradient turns away from the "
    "gradient (information, not a verdict).",
    "ef_grad_cosine": "cos(g, ẼF⁻¹g): how far the EF-preconditioned step turns away from the "
    "gradient; compare with nat_grad_cosine.",
    "nat_projection": "gᵀF̃⁻¹g: the gradient's squared length in the Fisher metric (for "
    "'all', a sum over layers).",
    "ef_projection": "gᵀẼF⁻¹g: the same in the EF metric; at most 1 per layer (a sum over "
    "layers for 'all', so at most the number of layers).",
    "ef_projection_per_sample": "(1/N) Σ gₙᵀẼF⁻¹gₙ: effective rank of the EF at this damping "
    "(→ rank EF as λ → 0; a sum over layers for 'all').",
    "dimension": "D, the number of parameters measured (constant).",
    "damping": "λ used (mean over the parameters for 'all').",
    "update_nat_cosine": "cos(applied update, −F̃⁻¹g): the optimizer's step against the "
    "natural-gradient step; 1 is a natural-gradient step.",
    "update_ef_cosine": "cos(applied update, −ẼF⁻¹g): the optimizer's step against the "
    "EF-preconditioned step.",
    "update_grad_cosine": "cos(applied update, −g): the optimizer's step against plain "
    "gradient descent.",
    "preconditioner_fisher_cosine": "cosine between the optimizer's diagonal preconditioner "
    "(e.g. √v̂ + ε) and √diag F; 1 means it scales coordinates like the Fisher.",
    "preconditioner_ef_cosine": "cosine between the optimizer's diagonal preconditioner and "
    "√diag EF; higher than the Fisher one means it tracks the EF.",
}
#: Descriptions of the ``probe/*`` scalars.
PROBE_DESCRIPTIONS: dict[str, str] = {
    "loss": "loss of the probe batch, as the loss module reduces it.",
    "batch_size": "number of probe samples measured (all processes together).",
    "grad_norm": "‖g‖, norm of the mean probe gradient over the measured layers.",
    "seconds": "wall time of this measurement, logging included.",
    "overhead": "cumulative share of the fit's wall time spent in the monitor.",
}

_KEY = re.compile(
    r"^(?P<structure>[a-z][a-z0-9_]*)/(?P<metric>[a-z_]+?)"
    rf"(?P<stderr>{STDERR_SUFFIX})?(?P<damping>@[^/]+)?/(?P<layer>.+)$"
)


def register_structure(name: str) -> None:
    """Make ``name`` a valid structure in settings and keys (see :func:`registered_structures`).

    Called by :func:`fisher_monitor.structures.register`; registering a name twice is a
    no-op.

    Raises:
        ValueError: If ``name`` is not a lowercase identifier or is a reserved group name.
    """
    if not isinstance(name, str) or not _STRUCTURE_NAME.match(name):
        raise ValueError(
            f"Invalid structure name: {name!r}. Use a lowercase identifier such as 'lowrank'."
        )
    if name in (ALL, PROBE, OPTIMIZER):
        raise ValueError(f"Invalid structure name: {name!r} is reserved by the key format.")
    if name not in _REGISTERED:
        _REGISTERED.append(name)


def registered_structures() -> tuple[str, ...]:
    """Every structure name settings accept: the built-in ones, then the registered ones."""
    return tuple(_REGISTERED)


def damping_suffix(damping: float, several: bool) -> str:
    """The key suffix of a damping value: ``""``, or ``"@{value}"`` with several dampings.

    Args:
        damping: The damping value.
        several: Whether several damping values are reported.

    Returns:
        ``"@" + repr(float(damping))`` when ``several``, else the empty string.
    """
    return f"@{float(damping)!r}" if several else ""


def metric_key(structure: str, metric: str, layer: str, suffix: str = "") -> str:
    """``"{structure}/{metric}{suffix}/{layer}"``, e.g. ``"block/kl@0.001/all"``."""
    return f"{structure}/{metric}{suffix}/{layer}"


def stderr_key(structure: str, metric: str, layer: str, suffix: str = "") -> str:
    """Key of the standard error of an estimated metric: ``"{structure}/{metric}_se…"``."""
    return f"{structure}/{metric}{STDERR_SUFFIX}{suffix}/{layer}"


def optimizer_key(metric: str, layer: str) -> str:
    """``"optimizer/{metric}/{layer}"``."""
    return f"{OPTIMIZER}/{metric}/{layer}"


def probe_key(name: str) -> str:
    """``"probe/{name}"``."""
    return f"{PROBE}/{name}"


@dataclass(frozen=True)
class ParsedKey:
    """The parts of a metric key.

    Attributes:
        structure: ``"diag"``, ``"block"``, ``"kron"`` or ``"optimizer"``.
        metric: The metric name, without suffixes.
        layer: Layer name or ``"all"``.
        damping: The damping suffix's value as written (``"0.001"``), or ``None``.
        stderr: Whether the key holds the standard error of the metric.
    """

    structure: str
    metric: str
    layer: str
    damping: str | None = None
    stderr: bool = False


@functools.lru_cache(maxsize=1 << 15)
def parse_key(key: str) -> ParsedKey | None:
    """Split a metric key (without a logging prefix) into its parts.

    Cached: the callback parses the same few thousand keys at every measurement (the
    result is immutable).

    Args:
        key: e.g. ``"block/direction_cosine@0.001/encoder.fc1"``.

    Returns:
        The parts, or ``None`` when ``key`` is not a structure or optimizer metric key
        (e.g. ``"probe/loss"``) or names an unknown metric.
    """
    match = _KEY.match(key)
    if match is None or match["structure"] == PROBE:
        return None
    metric = match["metric"]
    known = OPTIMIZER_METRICS if match["structure"] == OPTIMIZER else METRICS + UPDATE_METRICS
    if metric not in known:
        return None
    damping = match["damping"][1:] if match["damping"] else None
    return ParsedKey(match["structure"], metric, match["layer"], damping, bool(match["stderr"]))


def primary_structure(structures: Iterable[str]) -> str | None:
    """The first of :data:`PRIMARY_ORDER` among ``structures`` (``None`` when none is)."""
    present = {str(getattr(s, "value", s)) for s in structures}
    return next((s for s in PRIMARY_ORDER if s in present), None)


__all__ = [
    "ALL",
    "COSINE_METRICS",
    "CONSTANT_METRICS",
    "DAMPED_METRICS",
    "DESCRIPTIONS",
    "METRICS",
    "OPTIMIZER",
    "OPTIMIZER_METRICS",
    "PRIMARY_ORDER",
    "PROBE",
    "PROBE_DESCRIPTIONS",
    "ParsedKey",
    "STDERR_SUFFIX",
    "STRUCTURES",
    "UNDAMPED_METRICS",
    "UPDATE_METRICS",
    "damping_suffix",
    "metric_key",
    "optimizer_key",
    "parse_key",
    "primary_structure",
    "probe_key",
    "register_structure",
    "registered_structures",
]
