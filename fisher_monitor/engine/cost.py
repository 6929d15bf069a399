"""The cost model: measure the exact Fisher, or estimate it, decided before the pass.

The exact Fisher's square-root factor has ``R_n`` columns per sample (``(C − 1)·T`` for a
cross-entropy over ``C`` classes and ``T`` positions) and ``R = R_n·N`` in all: the pass
backpropagates all of them, the ``diag`` structure sums their squares and the ``block``
structure factorises ``R × R`` Gram matrices, ``O(R³) = O((C·N)³)``. An estimator
(:mod:`fisher_monitor.estimators`) backpropagates ``k + 1`` columns per sample whatever
``C`` is. This module counts the floating-point work of both in units of one plain
training step of the same network and batch (forward plus backward, about three forward
passes), by asking each layer's factor representation and each structure for its work
(:meth:`~fisher_monitor.structures.base.Structure.flops`), and the memory with the
engine's memory model (:func:`fisher_monitor.engine.memory.estimate_peak_bytes`), and
chooses:

- the **exact** pass when it fits the memory budget and costs at most
  :data:`EXACT_BUDGET_STEPS` training steps, or at most :data:`EXACT_FLOOR_FLOPS` (work
  too small to matter), or at most :data:`SKETCH_SAVING` times the estimator (an estimate
  must save much to be worth its noise);
- the **sketch** otherwise (``docs/theory.md#estimators``), with a note that says why.

Under a sketch, the ``block`` metrics that need ``(F_b + λI)⁻¹`` of the exact Fisher come
from matrix-free solves after the pass (:mod:`~fisher_monitor.engine.exact_solves`): their
planned work (:func:`~fisher_monitor.engine.solve_settings.planned_solves`; each
Fisher-vector product is about a forward, a forward-mode and a backward pass of the layers
from ``b`` on) is part of the estimator's work, so the exact path is kept wherever it is
cheaper, and the solves are left out (with a note) when they would cost more than
:attr:`~fisher_monitor.engine.exact_solves.SolveSettings.budget_steps` training steps
(``solve_budget``) — planned here, and measured while they run
(:class:`~fisher_monitor.engine.solve_settings.SolveMeter`).

The counts are estimates of work, not of time: they follow the shapes (a Gram matrix of
``R`` columns of length ``L`` costs ``R²·L``, a factorisation about ``R³``), which is what
decides between ``R = (C − 1)·N`` and ``R = k·N``. The choice is per measurement (one pass
backpropagates one set of columns for every layer) and recorded per layer and structure
in the measurement's coverage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fisher_monitor.backends import Backend
from fisher_monitor.engine import memory
from fisher_monitor.engine.exact_solves import DEFAULT_SOLVES, SolveSettings
from fisher_monitor.engine.profile import NetworkProfile
from fisher_monitor.engine.solve_settings import PlannedLayer, planned_solves
from fisher_monitor.estimators import SketchDesign
from fisher_monitor.factors import RATES, PassSize, form_of
from fisher_monitor.settings import DampingMode, FisherType, MeasureSettings
from fisher_monitor.structures import STRUCTURES, Structure
from fisher_monitor.structures.fisher_solves import ExactSolves
from fisher_monitor.validation import format_bytes, format_steps

#: The exact path is taken while it costs at most this many plain training steps: an
#: exact answer is worth a slower measurement (the callback's budget schedule adapts its
#: cadence to the cost), until it costs what hundreds of steps do.
EXACT_BUDGET_STEPS = 250.0
#: Work below this many floating-point operations is never worth estimating (a few seconds
#: at most on any machine; tiny networks have tiny training steps).
EXACT_FLOOR_FLOPS = 2e10
#: The exact path is kept unless it costs more than this many times the estimator.
SKETCH_SAVING = 4.0
#: Forward passes' worth of work in a measurement's pass besides the loss-side columns
#: (the forward, the loss's own backward, the captures), and per backpropagated column (the
#: columns travel together, batched): fitted to BackPACK's pass on the benchmarks' MLP.
PASS_BASE, PASS_PER_COLUMN = 3.2, 0.85
#: The default sketch: replicate groups × sketched columns per sample in each group.
DEFAULT_SKETCH = SketchDesign(groups=6, columns_per_group=1)
#: Accepted values of ``estimator`` (``"auto"``: the cost model decides).
ESTIMATOR_CHOICES: tuple[str, ...] = ("auto", "exact", "sketch")


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
        structures: The structures this measurement runs (under a sketch, those with an
            estimator, each told about the sketch).
        skipped: Structures asked for that this measurement leaves out (no estimator).
        reason: Why the exact path was left (or kept despite its cost), for the notes.
        forced: Whether the caller chose (``estimator="exact"`` or ``"sketch"``).
        notes: What the measurement's notes should say about the plan.
        solves: Planned work of the exact-Fisher solves of a sketched measurement (part of
            ``estimated``; 0 when none run).
        solves_skipped: Why a sketched measurement runs no exact-Fisher solves, if it
            skips them although a structure could use them.
        solve_layers: Per layer, the planned products and work of the solves, whose meter
            times products against them (:class:`~fisher_monitor.engine.solve_settings.
            SolveMeter`); ``None`` when they run unmetered (none planned, or within
            ``floor_flops``).
    """

    sketch: SketchDesign | None
    exact_columns: int
    samples: int
    step_flops: float
    exact: Work
    estimated: Work
    structures: list[Structure] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    reason: str = ""
    forced: bool = False
    notes: list[str] = field(default_factory=list)
    solves: float = 0.0
    solves_skipped: str | None = None
    solve_layers: dict[str, PlannedLayer] | None = None

    @property
    def pass_columns(self) -> int:
        """Loss-side columns per sample the pass backpropagates."""
        return self.exact_columns if self.sketch is None else self.sketch.columns + 1

    def steps(self, work: Work) -> float:
        """``work`` in plain training steps."""
        return work.flops / self.step_flops if self.step_flops > 0 else math.inf

    def layer_estimators(self, structures: list[str]) -> dict[str, str | None]:
        """Per structure asked for, how a layer is measured: ``"exact"``, ``"sketch"`` or ``None``.

        ``None`` for a structure this measurement leaves out (no estimator under a sketch).
        """
        if self.sketch is None:
            return dict.fromkeys(structures, "exact")
        return {s: (None if s in self.skipped else "sketch") for s in structures}

    def taken(self) -> Work:
        """The work of the path this plan takes (the sketch's or the exact one)."""
        return self.exact if self.sketch is None else self.estimated

    def cost_dict(self) -> dict:
        """The model's estimate of this measurement, for :attr:`Measurement.settings`.

        ``steps``: plain training steps of the same network and batch; ``seconds``: the
        same in seconds on this machine class (:data:`~fisher_monitor.factors.RATES`,
        at the current thread count); ``peak_bytes``: the memory model's peak.
        """
        work = self.taken()
        return {
            "steps": round(self.steps(work), 2),
            "seconds": round(seconds(work.flops), 6),
            "peak_bytes": int(work.peak_bytes),
        }

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
            "exact_solves_cost_steps": round(self.steps(Work(self.solves, 0)), 1),
            "forced": self.forced,
        }


def seconds(units: float, threads: int | None = None) -> float:
    """Work in the units of :class:`~fisher_monitor.factors.Rates` as seconds on this machine."""
    threads = torch.get_num_threads() if threads is None else threads
    return units / (RATES.gemm32_rate * max(threads, 1) ** 0.85)


def check_estimator(estimator: str) -> str:
    """Validate an ``estimator=`` argument.

    Raises:
        ValueError: Naming the bad value and the supported ones.
    """
    if estimator not in ESTIMATOR_CHOICES:
        raise ValueError(f"Invalid estimator: {estimator!r}. Supported: {ESTIMATOR_CHOICES}.")
    return estimator


def structures_for(names: Sequence[str], sketch: SketchDesign | None) -> list[Structure]:
    """The structures of a measurement: all of ``names``, or under a sketch those with one."""
    if sketch is None:
        return [STRUCTURES[name]() for name in names]
    return [
        STRUCTURES[name](sketch=sketch)
        for name in names
        if STRUCTURES[name].sketch_unavailable is not None
    ]


def work(
    prepared: Backend, structures: Sequence[Structure], profile: NetworkProfile, size: PassSize
) -> Work:
    """The work and peak memory of one measurement with these structures and this pass.

    The pass runs the forward and the loss's backward (:data:`PASS_BASE` forward passes)
    and backpropagates every loss-side column, batched (:data:`PASS_PER_COLUMN` forward
    passes each); each layer's representation forms its diagonals, and each structure does
    its own work on the layer. All in the units of :class:`~fisher_monitor.factors.Rates`
    (float32 matrix-product operations), as the training step is counted.
    """
    forward = size.samples * profile.forward_flops
    flops = forward * (PASS_BASE + PASS_PER_COLUMN * size.pass_columns) + RATES.measurement
    for shape in profile.layers:
        flops += form_of(shape).pass_flops(shape, size)
        flops += sum(structure.flops(shape, size) + RATES.layer for structure in structures)
    peak = memory.estimate_peak_bytes(prepared, structures, profile, size)
    return Work(flops, int(peak))


def step_work(profile: NetworkProfile, samples: int) -> float:
    """A plain training step's work: three forward passes of products and its overheads."""
    layers = len(profile.layers)
    return 3.0 * samples * profile.forward_flops + RATES.step + RATES.step_layer * layers


def plan(
    prepared: Backend,
    settings: MeasureSettings,
    profile: NetworkProfile,
    samples: int,
    *,
    estimator: str = "auto",
    memory_budget: int | None = None,
    exact_only: str | None = None,
    sketch: SketchDesign | None = None,
    solves: SolveSettings | None = DEFAULT_SOLVES,
) -> CostPlan:
    """Decide how to measure the Fisher side of one probe batch.

    Args:
        prepared: The prepared backend.
        settings: Validated settings (``fisher="mc"`` is measured as asked: no estimator).
        profile: The network's one-sample profile (:func:`~fisher_monitor.engine.profile.
            profile`).
        samples: ``N``.
        estimator: ``"auto"`` (this cost model), ``"exact"`` or ``"sketch"``.
        memory_budget: Peak bytes a measurement may use (``None``: half the available
            memory, as the engine's memory model assumes).
        exact_only: Why this measurement must be exact, if it must (e.g. dense blocks
            were asked for); noted when the cost model would have estimated.
        sketch: The sketch's replicate groups and columns per group (``None``:
            :data:`DEFAULT_SKETCH`).
        solves: How the exact-Fisher solves of a sketched measurement run (see
            :mod:`~fisher_monitor.engine.exact_solves`); ``None``: none (the metrics that
            need ``(F + λI)⁻¹`` are then left out of a sketched measurement).

    Returns:
        The plan.
    """
    check_estimator(estimator)
    sketch = DEFAULT_SKETCH if sketch is None else sketch
    names = settings.structure_names
    design = SketchDesign(
        sketch.groups,
        sketch.columns_per_group,
        relative_damping=settings.damping_mode is DampingMode.RELATIVE,
    )
    columns = profile.fisher_columns(prepared)
    dampings, itemsize = len(settings.dampings), profile.itemsize
    step = step_work(profile, samples)
    exact_structures = structures_for(names, None)
    if settings.fisher is FisherType.MC:
        size = PassSize(samples, settings.mc_samples, False, dampings, itemsize)
        cost = work(prepared, exact_structures, profile, size)
        mc_columns = settings.mc_samples + 1
        return CostPlan(None, mc_columns, samples, step, cost, cost, exact_structures)
    exact = work(
        prepared, exact_structures, profile, PassSize(samples, columns, True, dampings, itemsize)
    )
    sketched = structures_for(names, design)
    estimated = work(
        prepared, sketched, profile, PassSize(samples, design.columns, False, dampings, itemsize)
    )
    result = CostPlan(None, columns, samples, step, exact, estimated, exact_structures)
    if solves is not None:
        random = random_attention(prepared.copy_root)
        result.estimated = _plan_solves(result, sketched, profile, design, solves, random)
    budget = (
        memory_budget if memory_budget is not None else memory.available_memory(prepared.device)
    )
    return _decide(result, design, sketched, names, estimator, budget, exact_only)


def _plan_solves(
    result: CostPlan,
    sketched: list[Structure],
    profile: NetworkProfile,
    design: SketchDesign,
    settings: SolveSettings,
    random: str | None = None,
) -> Work:
    """The estimator's work with the exact-Fisher solves, where they fit their budget.

    Switches them on for the structures that use them (:class:`~fisher_monitor.structures.
    fisher_solves.ExactSolves`); takes effect only if the plan sketches. Not for a network
    whose ``random`` modules draw masks the products cannot reproduce.
    """
    users = [s for s in sketched if isinstance(s, ExactSolves)]
    if not users:
        return result.estimated
    if random is not None:
        result.solves_skipped = (
            f"the network draws random masks in train mode ({random}), which Fisher-vector "
            "products cannot reproduce (set the dropout to 0 while measuring, or measure "
            "exactly)"
        )
        return result.estimated
    shifts = design.groups + 1 if design.relative_damping else 1
    # float64 products, in the float32 units of the rest of the plan
    layers = planned_solves(profile, result.samples, shifts, settings)
    flops = RATES.gemm64 * sum(layer.flops for layer in layers.values())
    steps = result.steps(Work(flops, 0))
    over = steps > settings.budget_steps and flops > settings.floor_flops
    if over or settings.budget_steps <= 0:  # 0: never, whatever the floor
        result.solves_skipped = (
            f"the exact-Fisher solves would need about {format_steps(steps)} training steps "
            f"(solve_budget {format_steps(settings.budget_steps)}; a larger solve_budget runs them)"
        )
        return result.estimated
    for structure in users:
        structure.exact_solves = True
    result.solves = flops
    result.solve_layers = layers if flops > settings.floor_flops else None
    return Work(result.estimated.flops + flops, result.estimated.peak_bytes)


def _decide(
    result: CostPlan,
    design: SketchDesign,
    sketched: list[Structure],
    names: Sequence[str],
    estimator: str,
    budget: int | None,
    exact_only: str | None,
) -> CostPlan:
    """Choose between the exact plan ``result`` and the sketch (see the module docstring)."""
    exact, estimated, step = result.exact, result.estimated, result.step_flops
    too_large = budget is not None and exact.peak_bytes > budget
    too_slow = exact.flops > max(
        EXACT_BUDGET_STEPS * step, EXACT_FLOOR_FLOPS, SKETCH_SAVING * estimated.flops
    )
    if estimator == "exact":
        result.forced = True
        return result
    if estimator != "sketch" and not (too_large or too_slow):
        return result
    if estimator == "sketch":
        if exact_only is not None:
            raise ValueError(f"estimator='sketch' cannot be used here: {exact_only}.")
        result.forced, result.reason = True, "estimator='sketch' was asked for"
    else:
        why = []
        if too_slow:
            why.append(f"about {format_steps(result.steps(exact))} training steps of work")
        if too_large:
            why.append(f"{format_bytes(exact.peak_bytes)} (budget {format_bytes(budget)})")
        cost = " and ".join(why)
        if exact_only is not None:
            result.reason = f"measured exactly although it needs {cost}: {exact_only}"
            result.notes.append(result.reason)
            return result
        columns, samples = result.exact_columns, result.samples
        result.reason = (
            f"the exact Fisher has {columns:,} square-root columns per sample "
            f"({columns * samples:,} for {samples} samples) and would need {cost}"
        )
    result.sketch, result.structures = design, sketched
    result.skipped = [name for name in names if name not in {s.name for s in sketched}]
    return result


def random_attention(network: nn.Module) -> str | None:
    """The first attention module in train mode with dropout, by name (else ``None``).

    Its dropout draws other masks under torch.func's transforms than in a plain forward,
    so the exact-Fisher solves cannot run (:meth:`~fisher_monitor.engine.fisher_operator.
    NetworkFunction.draws_differently` checks any network when they start); the plan does
    not count them.
    """
    for name, module in network.named_modules():
        if isinstance(module, nn.MultiheadAttention) and module.training and module.dropout > 0:
            return f"{name or 'the network'}: attention dropout {module.dropout:g}"
    return None


def estimator_notes(plan: CostPlan) -> list[str]:
    """What the measurement's notes say about the plan (a sketched Fisher, a forced exact)."""
    if plan.sketch is None:
        return list(plan.notes)
    sketch = plan.sketch
    solves = ""
    if plan.solves:
        planned = format_steps(plan.steps(Work(plan.solves, 0)))
        solves = f", of which {planned} for the exact-Fisher solves"
    notes = [
        f"{plan.reason}: the Fisher side is estimated from {sketch.columns} sketched columns "
        f"per sample in {sketch.groups} replicate groups (about "
        f"{format_steps(plan.steps(plan.estimated))} training steps{solves}; standard errors under "
        "the '…_se' keys; docs/theory.md#estimators)"
    ]
    for structure in plan.structures:
        if not structure.sketch_unavailable or getattr(structure, "exact_solves", False):
            continue
        missing = ", ".join(sorted(structure.sketch_unavailable))
        why = f" and {plan.solves_skipped}" if plan.solves_skipped else ""
        notes.append(
            f"{structure.name}: {missing} need (F + λI)⁻¹ of the exact Fisher: a sketch would "
            f"bias them{why}, so they are left out; fisher='mc' measures those of the "
            f"Monte-Carlo Fisher. A smaller probe_size does not make the exact path fit when "
            f"the output is large: its factor keeps {plan.exact_columns:,} columns per sample"
        )
    for name in plan.skipped:
        notes.append(
            f"{name}: this structure needs the exact Fisher's square-root columns; no {name} "
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
    "Work",
    "check_estimator",
    "estimator_notes",
    "plan",
    "random_attention",
    "seconds",
    "step_work",
    "structures_for",
    "work",
]
