"""The cost model: measure the exact Fisher, or estimate it, decided before the pass.

The exact Fisher's square-root factor has ``R_n`` columns per sample (``(C − 1)·T`` for a
cross-entropy over ``C`` classes and ``T`` positions) and ``R = R_n·N`` in all: the pass
backpropagates all of them, the ``diag`` structure sums their squares and the ``block``
structure factorises ``R × R`` Gram matrices, ``O(R³) = O((C·N)³)``. An estimator
(:mod:`fisher_monitor.estimators`) backpropagates ``k + 1`` columns per sample whatever
``C`` is. This module counts the floating-point work of both in units of one plain
training step of the same network and batch (forward plus backward, about three forward
passes), and the memory with the engine's memory model
(:func:`fisher_monitor.engine.memory.estimate_peak_bytes`), and chooses:

- the **exact** pass when it fits the memory budget and costs at most
  :data:`EXACT_BUDGET_STEPS` training steps, or at most :data:`EXACT_FLOOR_FLOPS` (work
  too small to matter), or at most :data:`SKETCH_SAVING` times the estimator (an estimate
  must save much to be worth its noise);
- the **sketch** otherwise (``docs/theory.md#estimators``), with a note that says why.

The counts are estimates of work, not of time: they follow the shapes (a Gram matrix of
``R`` columns of length ``L`` costs ``R²·L``, a factorisation about ``R³``), which is what
decides between ``R = (C − 1)·N`` and ``R = k·N``. The choice is per measurement (one pass
backpropagates one set of columns for every layer) and recorded per layer and structure
in the measurement's coverage.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

from torch import Tensor, nn

from fisher_monitor.curvature.backends import Backend
from fisher_monitor.curvature.factors import weight_sharing_costs, weight_sharing_diagonal_costs
from fisher_monitor.engine import memory
from fisher_monitor.estimators import SketchDesign
from fisher_monitor.estimators.block import FISHER_INVERSE_METRICS
from fisher_monitor.settings import DampingMode, FisherType, MeasureSettings, Structure

#: Layers BackPACK captures as weight-sharing factors (sums of outer products over positions).
_SHARING_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: The exact path is taken while it costs at most this many plain training steps: an
#: exact answer is worth a slower measurement (the callback's budget schedule adapts its
#: cadence to the cost), until it costs what hundreds of steps do.
EXACT_BUDGET_STEPS = 250.0
#: Work below this many floating-point operations is never worth estimating (a few seconds
#: at most on any machine; tiny networks have tiny training steps).
EXACT_FLOOR_FLOPS = 2e10
#: The exact path is kept unless it costs more than this many times the estimator.
SKETCH_SAVING = 4.0
#: The default sketch: replicate groups × sketched columns per sample in each group.
DEFAULT_SKETCH = SketchDesign(groups=6, columns_per_group=1)
#: Accepted values of ``estimator`` (``"auto"``: the cost model decides).
ESTIMATOR_CHOICES: tuple[str, ...] = ("auto", "exact", "sketch")


@dataclass(frozen=True)
class LayerShape:
    """What the cost model needs to know about one layer.

    Attributes:
        name: The layer's name.
        dimension: ``D_b``.
        outputs: ``O_b``, the output features of a ``Linear``/convolution (``D_b`` else).
        positions: ``T_b``, positions the weight is applied at (1 for a plain ``Linear``).
        forward_flops: Floating-point operations of the layer's forward for one sample.
        outer_product: Whether its factors are outer products (BackPACK, ``Linear`` on
            ``(N, I)``): Gram matrices then cost ``R²·O_b``, not ``R²·D_b``.
        weight_sharing: Whether its factors are weight-sharing sums over positions
            (BackPACK, convolutions and sequence ``Linear``): every quantity is formed in the
            cheaper of two forms (:func:`~fisher_monitor.curvature.factors.
            weight_sharing_costs`), never as the ``R × D`` matrix.
    """

    name: str
    dimension: int
    outputs: int
    positions: int
    forward_flops: float
    outer_product: bool
    weight_sharing: bool = False


@dataclass(frozen=True)
class Work:
    """Estimated work of one way to measure.

    Attributes:
        flops: Floating-point operations.
        peak_bytes: Peak memory (the engine's memory model).
    """

    flops: float
    peak_bytes: int


@dataclass
class CostPlan:
    """The decision for one measurement.

    Attributes:
        sketch: The sketch when the Fisher's factor is estimated, else ``None``.
        exact_columns: ``R_n``, the exact factor's columns per sample.
        samples: ``N``.
        step_flops: Work of one plain training step (forward and backward).
        exact: Work of the exact measurement.
        estimated: Work of the sketched measurement.
        reason: Why the exact path was left (or kept despite its cost), for the notes.
        forced: Whether the caller chose (``estimator="exact"`` or ``"sketch"``).
    """

    sketch: SketchDesign | None
    exact_columns: int
    samples: int
    step_flops: float
    exact: Work
    estimated: Work
    reason: str = ""
    forced: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def pass_columns(self) -> int:
        """Loss-side columns per sample the pass backpropagates."""
        return self.exact_columns if self.sketch is None else self.sketch.columns + 1

    def steps(self, work: Work) -> float:
        """``work`` in plain training steps."""
        return work.flops / self.step_flops if self.step_flops > 0 else math.inf

    def layer_estimators(self, structures: list[str], estimated: list[str]) -> dict[str, str]:
        """Per structure, how a layer is measured: ``"exact"``, ``"sketch"`` or ``None``.

        Args:
            structures: The structures asked for.
            estimated: Those that have an estimator (the others are not measured under a
                sketch: ``None``).
        """
        if self.sketch is None:
            return dict.fromkeys(structures, "exact")
        return {s: ("sketch" if s in estimated else None) for s in structures}

    def as_dict(self) -> dict:
        """Plain data for :attr:`Measurement.settings` (only when estimating)."""
        if self.sketch is None:
            return {"method": "exact"}
        return {
            "method": "sketch",
            "columns_per_sample": self.sketch.columns,
            "groups": self.sketch.groups,
            "exact_columns_per_sample": self.exact_columns,
            "exact_cost_steps": round(self.steps(self.exact), 1),
            "estimated_cost_steps": round(self.steps(self.estimated), 1),
            "forced": self.forced,
        }


# --------------------------------------------------------------------------- shapes
_SHAPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def layer_shapes(prepared: Backend, inputs) -> tuple[list[LayerShape], int]:
    """Layer shapes and ``R_n`` from one forward pass of one sample (cached per input shape).

    Args:
        prepared: The prepared backend.
        inputs: The probe batch's inputs (only the first sample is used).

    Returns:
        The measured layers' shapes and the exact factor's columns per sample.
    """
    tensors = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    key = tuple(tuple(t.shape[1:]) for t in tensors)
    cache = _SHAPES.setdefault(prepared, {})
    if key not in cache:
        cache[key] = _profile(prepared, inputs)
    return cache[key]


def _profile(prepared: Backend, inputs) -> tuple[list[LayerShape], int]:
    outputs_seen: dict[str, int] = {}
    hooks = []
    for info, module in prepared.layers:
        try:
            copy = prepared.copy_of(module)
        except KeyError:
            continue

        def hook(_module, _args, output, name=info.name):
            if isinstance(output, Tensor):
                outputs_seen[name] = output[:1].numel()

        hooks.append((copy, hook))
    output = memory.one_sample_forward(prepared, inputs, hooks)
    sample_shape = tuple(output.shape[1:]) if isinstance(output, Tensor) else (1,)
    columns = max(prepared.likelihood.fisher_columns(sample_shape), 1)
    structured = prepared.backend == "backpack"
    shapes = []
    for info, module in prepared.layers:
        weight = getattr(module, "weight", None)
        weighted = isinstance(weight, Tensor) and weight.dim() >= 2
        outputs = int(weight.shape[0]) if weighted else info.dimension
        elements = outputs_seen.get(info.name, outputs)
        positions = max(1, elements // max(outputs, 1)) if weighted else 1
        flops = 2.0 * info.dimension * positions if weighted else 2.0 * elements
        outer = structured and isinstance(module, nn.Linear) and positions == 1
        sharing = structured and weighted and not outer and isinstance(module, _SHARING_TYPES)
        shapes.append(
            LayerShape(info.name, info.dimension, outputs, positions, flops, outer, sharing)
        )
    return shapes, columns


# --------------------------------------------------------------------------- work
def _structure_flops(
    shape: LayerShape, samples: int, columns: int, settings: MeasureSettings, exact: bool
) -> float:
    """Work of the structures on one layer with ``columns`` Fisher columns per sample."""
    if shape.weight_sharing:
        return _weight_sharing_flops(shape, samples, columns, settings, exact)
    d, o, t = float(shape.dimension), float(shape.outputs), float(shape.positions)
    inputs = d / o
    n, r = float(samples), float(columns * samples)
    length = o if shape.outer_product else d
    flops = 0.0
    if not shape.outer_product:  # factors materialised from positions, or per-sample pullbacks
        flops += 2.0 * (r + n) * d * t
    flops += 2.0 * (r * length + n * o * inputs)  # diagonals
    if Structure.BLOCK in settings.structures:
        if exact and d <= r:  # dense blocks and their eigendecomposition
            flops += 2.0 * r * d * d + 10.0 * d**3
        else:
            flops += 2.0 * (r * r + 2.0 * n * r) * length
            if exact:
                flops += _factorisation_flops(r, settings)
    if Structure.KRON in settings.structures:  # factors, their eigendecompositions, K_U
        flops += 10.0 * (o**3 + inputs**3) + 2.0 * r * o * o * t + 2.0 * n * t * inputs**2
        flops += 2.0 * n * n * length
    return flops


def _factorisation_flops(r: float, settings: MeasureSettings) -> float:
    """Work of the Cholesky or eigendecomposition of ``λI + K_V`` with its solves.

    LAPACK runs at a fraction of a matrix product's speed: counted as ``2R³`` per damping.
    """
    return 2.0 * min(len(settings.dampings), 4) * r**3


def _weight_sharing_flops(
    shape: LayerShape, samples: int, columns: int, settings: MeasureSettings, exact: bool
) -> float:
    """Work on a weight-sharing layer, each quantity in the cheaper of its two forms."""
    d, o, t = shape.dimension, shape.outputs, shape.positions
    inputs = max(1, d // max(o, 1))
    n, r = samples, columns * samples
    flops = 2.0 * min(weight_sharing_diagonal_costs(columns + 1, n, t, o, inputs))
    if Structure.BLOCK in settings.structures:
        for left, right in ((columns, columns), (1, columns), (1, 1)):  # K_V, K_UV, K_U
            flops += 2.0 * min(weight_sharing_costs(left, right, n, t, o, inputs))
        if exact:
            flops += _factorisation_flops(float(r), settings)
    if Structure.KRON in settings.structures:  # factors through their roots where wide
        rank = min(inputs, n * t)
        flops += 10.0 * (min(o, r * t) ** 3 + rank**3) + 2.0 * (r + n) * t * (o + inputs) * rank
    return flops


def _work(
    prepared: Backend,
    settings: MeasureSettings,
    shapes: list[LayerShape],
    samples: int,
    columns: int,
    pass_columns: int,
    exact: bool,
) -> Work:
    forward = samples * sum(s.forward_flops for s in shapes)
    flops = forward * (1.0 + 2.0 * pass_columns)
    flops += sum(_structure_flops(s, samples, columns, settings, exact) for s in shapes)
    peak = memory.estimate_peak_bytes(prepared, settings, samples, pass_columns)
    return Work(flops, int(peak))


# --------------------------------------------------------------------------- decision
def check_estimator(estimator: str) -> str:
    """Validate an ``estimator=`` argument.

    Raises:
        ValueError: Naming the bad value and the supported ones.
    """
    if estimator not in ESTIMATOR_CHOICES:
        raise ValueError(f"Invalid estimator: {estimator!r}. Supported: {ESTIMATOR_CHOICES}.")
    return estimator


def plan(
    prepared: Backend,
    settings: MeasureSettings,
    inputs,
    samples: int,
    *,
    estimator: str = "auto",
    memory_budget: int | None = None,
    exact_only: str | None = None,
    sketch: SketchDesign | None = None,
) -> CostPlan:
    """Decide how to measure the Fisher side of one probe batch.

    Args:
        prepared: The prepared backend.
        settings: Validated settings (``fisher="mc"`` is measured as asked: no estimator).
        inputs: The probe batch's inputs.
        samples: ``N``.
        estimator: ``"auto"`` (this cost model), ``"exact"`` or ``"sketch"``.
        memory_budget: Peak bytes a measurement may use (``None``: half the available
            memory, as the engine's memory model assumes).
        exact_only: Why this measurement must be exact, if it must (e.g. dense blocks
            were asked for); noted when the cost model would have estimated.
        sketch: The sketch's replicate groups and columns per group (``None``:
            :data:`DEFAULT_SKETCH`).

    Returns:
        The plan.
    """
    check_estimator(estimator)
    sketch = DEFAULT_SKETCH if sketch is None else sketch
    shapes, columns = layer_shapes(prepared, inputs)
    design = SketchDesign(
        sketch.groups,
        sketch.columns_per_group,
        relative_damping=settings.damping_mode is DampingMode.RELATIVE,
    )
    forward = samples * sum(s.forward_flops for s in shapes)
    step = 3.0 * forward
    if settings.fisher is FisherType.MC:
        pass_columns = settings.mc_samples + 1
        work = _work(prepared, settings, shapes, samples, settings.mc_samples, pass_columns, False)
        return CostPlan(None, pass_columns, samples, step, work, work)
    exact = _work(prepared, settings, shapes, samples, columns, columns, True)
    estimated = _work(
        prepared, settings, shapes, samples, design.columns, design.columns + 1, False
    )
    result = CostPlan(None, columns, samples, step, exact, estimated)
    budget = (
        memory_budget if memory_budget is not None else memory.available_memory(prepared.device)
    )
    too_large = budget is not None and exact.peak_bytes > budget
    too_slow = exact.flops > max(
        EXACT_BUDGET_STEPS * step, EXACT_FLOOR_FLOPS, SKETCH_SAVING * estimated.flops
    )
    if estimator == "exact":
        result.forced = True
        return result
    if estimator == "sketch":
        if exact_only is not None:
            raise ValueError(f"estimator='sketch' cannot be used here: {exact_only}.")
        result.sketch, result.forced = design, True
        result.reason = "estimator='sketch' was asked for"
        return result
    if not (too_large or too_slow):
        return result
    why = []
    if too_slow:
        steps = result.steps(exact)
        amount = f"{steps:,.0f}" if steps < 1e6 else f"{steps:.1e}"
        why.append(f"about {amount} training steps of work")
    if too_large:
        why.append(f"{exact.peak_bytes / 2**30:,.1f} GiB (budget {budget / 2**30:,.1f} GiB)")
    cost = " and ".join(why)
    if exact_only is not None:
        result.reason = f"measured exactly although it needs {cost}: {exact_only}"
        result.notes.append(result.reason)
        return result
    result.sketch = design
    result.reason = (
        f"the exact Fisher has {columns:,} square-root columns per sample ({columns * samples:,} "
        f"for {samples} samples) and would need {cost}"
    )
    return result


def estimator_notes(plan: CostPlan, structures: list[str]) -> list[str]:
    """What the measurement's notes say about a sketched Fisher."""
    if plan.sketch is None:
        return list(plan.notes)
    sketch = plan.sketch
    notes = [
        f"{plan.reason}: the Fisher side is estimated from {sketch.columns} sketched columns "
        f"per sample in {sketch.groups} replicate groups (about "
        f"{plan.steps(plan.estimated):,.0f} training steps; standard errors under the "
        "'…_se' keys; docs/theory.md#estimators)"
    ]
    if "block" in structures:
        inverse = ", ".join(sorted(FISHER_INVERSE_METRICS))
        notes.append(
            f"block: {inverse} need (F + λI)⁻¹ of the exact Fisher and are not estimated "
            "from a sketch; fisher='mc' measures those of the Monte-Carlo Fisher, and a "
            "smaller probe_size lets the exact path fit"
        )
    if "kron" in structures:
        notes.append(
            "kron: the Kronecker factors need the exact Fisher's square-root columns; no kron "
            "metrics in this measurement"
        )
    return notes


__all__ = [
    "DEFAULT_SKETCH",
    "ESTIMATOR_CHOICES",
    "EXACT_BUDGET_STEPS",
    "EXACT_FLOOR_FLOPS",
    "SKETCH_SAVING",
    "CostPlan",
    "LayerShape",
    "Work",
    "check_estimator",
    "estimator_notes",
    "layer_shapes",
    "plan",
]
