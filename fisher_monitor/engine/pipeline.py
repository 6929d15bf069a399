"""One measurement as a pipeline: backend pass → per-layer structures → sums → metrics.

The backend delivers each layer's factors during its pass (output layer first); the
:class:`LayerCollector` keeps the layer's diagonals and runs every structure that needs the
factors right away, so that only one layer's factors are alive at a time. The diagonal
structure runs afterwards on the collected (and, under data parallelism, reduced)
diagonals. Per-layer statistics add up to the whole network (``all``), and
:func:`~fisher_monitor.metrics.finalize` turns sums into metrics. Everything that belongs
to this measurement (notes, coverage, skipped layers) lives in the collector and the
returned :class:`~fisher_monitor.measurement.Measurement`, never on the prepared network.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fisher_monitor import keys
from fisher_monitor.backends import Backend
from fisher_monitor.backends.pass_context import PassResult
from fisher_monitor.engine import cost
from fisher_monitor.engine.distributed_diagonals import Diagonals, reduce_diagonals
from fisher_monitor.engine.exact_solves import (
    DEFAULT_SOLVES,
    SolveReport,
    SolveSettings,
    add_probe_errors,
    solve_deferred,
    solve_notes,
)
from fisher_monitor.engine.profile import profile
from fisher_monitor.estimators import (
    Replicates,
    SketchDesign,
    add_estimated_metrics,
    sum_replicates,
)
from fisher_monitor.factors import LayerFactors
from fisher_monitor.layers import LayerInfo
from fisher_monitor.likelihoods import SketchedLikelihood
from fisher_monitor.measurement import Measurement
from fisher_monitor.metrics import LayerStatistics, finalize, sum_statistics
from fisher_monitor.settings import DampingMode, FisherType, MeasureSettings
from fisher_monitor.structures import (
    STRUCTURES,
    LayerInput,
    LayerResult,
    Structure,
    StructureUnavailable,
)

#: Largest layer whose dense blocks ``keep_blocks=True`` will form.
MAX_KEPT_BLOCK = 8192


@dataclass
class MeasureOptions:
    """What one measurement should return besides the metrics.

    Attributes:
        seed: Seed of the pass (label sampling, dropout masks).
        all_reduce: For data-parallel diagonal measurements, a function that sums a
            float64 tensor over all processes (``structures=("diag",)`` only).
        keep_blocks: Also return each layer's dense ``(F_b, EF_b, g_b)``.
        keep_directions: Also return ``(A⁻¹g, B⁻¹g)`` per structure, damping and layer.
        dtype: Floating-point type of the curvature arithmetic.
        estimator: ``"auto"`` (the cost model, :mod:`fisher_monitor.engine.cost`, decides
            between the exact Fisher and an estimator), ``"exact"`` or ``"sketch"``.
        memory_budget: Peak bytes the cost model allows the exact path (``None``: half the
            available memory).
        sketch: Replicate groups and columns per group of an estimator (``None``: the cost
            model's default).
        solves: How the exact-Fisher solves of a sketched measurement run (the ``block``
            metrics that need ``(F + λI)⁻¹``; :mod:`~fisher_monitor.engine.exact_solves`);
            ``None``: none, those metrics are then left out under a sketch.
    """

    seed: int
    all_reduce: Callable[[Tensor], Tensor] | None = None
    keep_blocks: bool = False
    keep_directions: bool = False
    dtype: torch.dtype = torch.float64
    estimator: str = "auto"
    memory_budget: int | None = None
    sketch: SketchDesign | None = None
    solves: SolveSettings | None = field(default_factory=SolveSettings)


def layer_dampings(
    settings: MeasureSettings, trace: float, dimension: int
) -> tuple[list[float], bool]:
    """Per-layer damping values ``λ_b`` (the same for every structure of the layer).

    ``damping · tr F_b / D_b`` in relative mode (``tr F_b`` of the exact block, i.e. of the
    diagonal), ``damping`` in absolute mode.

    Returns:
        The dampings, and whether the relative rule fell back to the absolute values (a
        layer whose Fisher trace is zero or not finite).
    """
    if settings.damping_mode is DampingMode.ABSOLUTE:
        return list(settings.dampings), False
    scale = trace / dimension
    if not (scale > 0 and math.isfinite(scale)):
        return list(settings.dampings), True
    return [d * scale for d in settings.dampings], False


@dataclass
class LayerCollector:
    """Receives each layer's factors during a pass and keeps this measurement's results."""

    settings: MeasureSettings
    options: MeasureOptions
    structures: list[Structure]
    diagonals: Diagonals = field(default_factory=dict)
    results: dict[str, dict[str, LayerResult]] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    blocks: dict[str, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)
    damping_fallback: set[str] = field(default_factory=set)
    skipped_names: dict[str, set[str]] = field(default_factory=dict)

    def __post_init__(self):
        for structure in self.structures:
            self.results[structure.name] = {}
            self.skipped[structure.name] = []

    def layer_input(
        self, info: LayerInfo, diagonals: tuple[Tensor, Tensor, Tensor], factors=None
    ) -> LayerInput:
        """A :class:`LayerInput` with the layer's dampings."""
        fisher, empirical, gradient = diagonals
        dampings, fell_back = layer_dampings(self.settings, float(fisher.sum()), info.dimension)
        if fell_back:
            self.damping_fallback.add(info.name)
        return LayerInput(info, fisher, empirical, gradient, factors, dampings)

    def __call__(self, info: LayerInfo, factors: LayerFactors) -> None:
        """The backend's per-layer callback."""
        fisher, empirical = factors.cached_diagonals()
        gradient = factors.mean_gradient()
        # one reduction instead of elementwise checks: NaN and ±inf survive a sum
        if not bool(torch.isfinite(fisher.sum() + empirical.sum() + gradient.sum())):
            raise FloatingPointError(
                f"Non-finite gradients or curvature in layer {info.name!r}; skipping the "
                "measurement."
            )
        self.diagonals[info.name] = (fisher, empirical, gradient)
        layer = self.layer_input(info, (fisher, empirical, gradient), factors)
        if self.options.keep_blocks:
            self.blocks[info.name] = tuple(t.detach().cpu() for t in layer.dense_blocks())
        for structure in self.structures:
            if structure.needs_factors:
                self.run(structure, layer)

    def run(self, structure: Structure, layer: LayerInput) -> None:
        """Run one structure on one layer, noting a layer it has no form for."""
        try:
            result = structure.layer(layer, directions=self.options.keep_directions)
        except StructureUnavailable:
            self.skipped[structure.name].append(f"{layer.info.name} ({layer.info.module_type})")
            self.skipped_names.setdefault(structure.name, set()).add(layer.info.name)
            return
        self.results[structure.name][layer.info.name] = result

    def skipped_layers(self, structure: str) -> set[str]:
        """The layers a structure had no form for in this measurement."""
        return self.skipped_names.get(structure, set())


def plan_measurement(
    prepared: Backend, settings: MeasureSettings, inputs, size: int, options: MeasureOptions
) -> cost.CostPlan:
    """The cost model's plan for ``size`` samples shaped like ``inputs`` (once per measurement).

    Args:
        prepared: The prepared backend.
        settings: Validated settings.
        inputs: The probe batch's inputs (its first sample profiles the network, once per
            input shape).
        size: ``N``.
        options: The measurement's options (estimator, memory budget, sketch design).
    """
    return cost.plan(
        prepared,
        settings,
        profile(prepared, inputs),
        size,
        estimator=options.estimator,
        memory_budget=options.memory_budget,
        exact_only=exact_only_reason(options, list(settings.structure_names)),
        sketch=options.sketch,
        solves=options.solves,
    )


def measure_once(
    prepared: Backend,
    settings: MeasureSettings,
    inputs,
    targets: Tensor,
    options: MeasureOptions,
    plan: cost.CostPlan,
) -> Measurement:
    """One measurement on a probe batch already on the network's device.

    The pipeline: the cost model's plan (the exact Fisher or an estimator, made by the
    caller) → the backend's pass, whose per-layer callback runs the structures that need
    the factors → under a sketch, the exact-Fisher solves of the results the structures
    deferred (:mod:`~fisher_monitor.engine.exact_solves`) → the data-parallel reduction of
    the diagonals → the structures that need only the diagonals → the scalars (per layer,
    summed to ``all``) → the :class:`Measurement`.

    Args:
        prepared: The prepared backend.
        settings: Validated settings.
        inputs: Input tensor (or tuple of tensors passed as positional arguments).
        targets: Targets for the loss; the first dimension is the batch.
        options: What to return besides the metrics.
        plan: The cost model's plan for this probe (:func:`~fisher_monitor.engine.cost.
            plan`), with the structures to run.

    Returns:
        The measurement (without ``probe/seconds``, which the caller adds).
    """
    _check_options(prepared, settings, options)
    names = list(settings.structure_names)
    structures = plan.structures
    collector = LayerCollector(settings, options, structures)
    result = _run_pass(prepared, settings, inputs, targets, options, plan, collector)
    solved = solve_deferred(
        prepared,
        inputs,
        collector.results,
        options.seed,
        options.solves or DEFAULT_SOLVES,
        plan.solve_layers,
    )
    reduced = _reduce(prepared, collector, result, options)
    _run_diagonal_structures(structures, collector, reduced)
    scalars = _scalars(collector, reduced.layers, settings)
    scalars.update(_probe_scalars(reduced))
    return Measurement(
        scalars=scalars,
        layers=reduced.layers,
        diagonals={
            name: (f.detach().cpu(), e.detach().cpu())
            for name, (f, e, _) in reduced.diagonals.items()
            if name in reduced.gradients
        },
        settings=_measured_settings(settings, plan, solved),
        notes=_notes(prepared, result.notes, result.measured, collector)
        + cost.estimator_notes(plan)
        + (solve_notes(solved) if solved is not None else []),
        blocks={
            info.name: collector.blocks[info.name]
            for info in reduced.layers
            if info.name in collector.blocks
        },
        coverage=_coverage(prepared, result, plan.layer_estimators(names), collector),
        gradient=reduced.gradients,
        directions=_directions(collector, reduced.layers) if options.keep_directions else {},
    )


def _check_options(prepared: Backend, settings: MeasureSettings, options: MeasureOptions) -> None:
    """Refuse options this measurement cannot honour, before any work."""
    if options.all_reduce is not None and settings.structure_names != ("diag",):
        raise ValueError("all_reduce is only supported for structures=('diag',).")
    if options.keep_blocks:
        _check_kept_blocks(prepared)


def _run_pass(
    prepared: Backend,
    settings: MeasureSettings,
    inputs,
    targets: Tensor,
    options: MeasureOptions,
    plan: cost.CostPlan,
    collector: LayerCollector,
) -> PassResult:
    """The backend's pass, delivering each layer's factors to ``collector``.

    The exact Fisher's columns (``fisher="exact"``) or ``mc_samples`` sampled labels per
    sample; under the plan's sketch, the sketch's columns instead.
    """
    sketched = plan.sketch is not None
    return prepared.run(
        inputs,
        targets,
        exact=settings.fisher is FisherType.EXACT and not sketched,
        mc_samples=plan.sketch.columns if sketched else settings.mc_samples,
        seed=options.seed,
        on_layer=collector,
        dtype=options.dtype,
        likelihood=SketchedLikelihood(prepared.likelihood) if sketched else None,
    )


@dataclass
class _Reduced:
    """The pass's diagonals, loss and batch size, summed over processes where asked.

    Attributes:
        diagonals: ``(diag F_b, diag EF_b, g_b)`` per layer.
        loss: The probe loss.
        batch_size: ``N`` (of all processes together under data parallelism).
        layers: The layers that have diagonals, in the prepared network's order.
        gradients: ``g_b`` per layer of ``layers``.
    """

    diagonals: Diagonals
    loss: float
    batch_size: float
    layers: list[LayerInfo]
    gradients: dict[str, Tensor]


def _reduce(
    prepared: Backend, collector: LayerCollector, result: PassResult, options: MeasureOptions
) -> _Reduced:
    """The collected diagonals, reduced across processes when ``options.all_reduce`` is set."""
    all_layers = [info for info, _ in prepared.layers]
    diagonals, loss, batch_size = collector.diagonals, result.loss, float(result.batch_size)
    if options.all_reduce is not None:
        diagonals, loss, batch_size = reduce_diagonals(
            diagonals,
            all_layers,
            loss,
            batch_size,
            options.all_reduce,
            prepared.likelihood.reduction == "sum",
        )
    layers = [info for info in all_layers if info.name in diagonals]
    gradients = {info.name: diagonals[info.name][2] for info in layers}
    return _Reduced(diagonals, loss, batch_size, layers, gradients)


def _run_diagonal_structures(
    structures: list[Structure], collector: LayerCollector, reduced: _Reduced
) -> None:
    """Run the structures that need only the (reduced) diagonals on every layer."""
    for structure in structures:
        if not structure.needs_factors:
            for info in reduced.layers:
                collector.run(structure, collector.layer_input(info, reduced.diagonals[info.name]))


def _probe_scalars(reduced: _Reduced) -> dict[str, float]:
    """``probe/loss``, ``probe/batch_size`` and ``probe/grad_norm`` = ``(Σ_b ‖g_b‖²)^½``."""
    grad_sq = sum(float(g.square().sum()) for g in reduced.gradients.values())
    return {
        keys.probe_key("loss"): reduced.loss,
        keys.probe_key("batch_size"): reduced.batch_size,
        keys.probe_key("grad_norm"): grad_sq**0.5,
    }


def _measured_settings(
    settings: MeasureSettings, plan: cost.CostPlan, solved: SolveReport | None
) -> dict:
    """The settings as measured: with the estimator's design where the plan sketched."""
    measured_settings = settings.as_dict()
    measured_settings["cost"] = plan.cost_dict()  # the cost model's estimate of this call
    if plan.sketch is not None:
        measured_settings["estimator"] = plan.as_dict()
        if solved is not None:
            measured_settings["estimator"]["exact_solves"] = solved.as_dict()
    return measured_settings


def exact_only_reason(options: MeasureOptions, names: list[str]) -> str | None:
    """Why a measurement must use the exact Fisher whatever it costs, if it must.

    Args:
        options: The measurement's options.
        names: The structures asked for.
    """
    if not any(STRUCTURES[name].sketch_unavailable is not None for name in names):
        return f"no estimator for {', '.join(names)}"
    if options.keep_blocks:
        return "keep_blocks=True returns the exact dense blocks"
    if options.all_reduce is not None:
        return "data-parallel diagonals are reduced across processes exactly"
    return None


def _check_kept_blocks(prepared: Backend) -> None:
    too_large = [
        f"{info.name} (D={info.dimension})"
        for info, _ in prepared.layers
        if info.dimension > MAX_KEPT_BLOCK
    ]
    if too_large:
        raise ValueError(
            f"keep_blocks=True forms dense D × D blocks, limited to D ≤ {MAX_KEPT_BLOCK}; "
            f"too large: {', '.join(too_large)}."
        )


def _scalars(
    collector: LayerCollector, layers: list[LayerInfo], settings: MeasureSettings
) -> dict[str, float]:
    """Every layer's metrics and the whole network's, per structure."""
    scalars: dict[str, float] = {}
    for structure, per_layer in collector.results.items():
        ordered = [info.name for info in layers if info.name in per_layer]
        for name in ordered:
            _add_results(scalars, structure, name, [per_layer[name]], settings)
        if ordered:
            _add_results(scalars, structure, keys.ALL, [per_layer[n] for n in ordered], settings)
    return scalars


def _add_results(
    scalars: dict[str, float],
    structure: str,
    layer: str,
    results: list[LayerResult],
    settings: MeasureSettings,
) -> None:
    """Metrics of one layer or of a sum of layers; with standard errors where estimated."""
    estimated = [r.replicates for r in results if r.replicates is not None]
    if not estimated:
        total = sum_statistics([r.statistics for r in results])
        _add_metrics(scalars, structure, layer, total, settings)
        return
    groups = estimated[0].groups
    replicates = [r.replicates or Replicates.fixed(r.statistics, groups) for r in results]
    add_estimated_metrics(scalars, structure, layer, sum_replicates(replicates), settings.dampings)
    add_probe_errors(scalars, structure, layer, results, list(settings.dampings))


def _add_metrics(
    scalars: dict[str, float],
    structure: str,
    layer: str,
    statistics: LayerStatistics,
    settings: MeasureSettings,
) -> None:
    metrics = finalize(statistics, settings.dampings, where=f"{structure}/{layer}")
    for metric, value in metrics.items():
        name, _, suffix = metric.partition("@")
        scalars[keys.metric_key(structure, name, layer, f"@{suffix}" if suffix else "")] = value


def _notes(
    prepared: Backend, pass_notes: list[str], measured: list[str], collector: LayerCollector
) -> list[str]:
    notes = list(prepared.preparation_notes) + list(pass_notes)
    unused = [info.name for info, _ in prepared.layers if info.name not in measured]
    if unused:
        notes.append(f"not measured (no gradient reached them): {', '.join(unused)}")
    for structure, skipped in collector.skipped.items():
        if not skipped:
            continue
        covered = collector.results.get(structure)
        if not covered and prepared.backend == "functorch" and structure == "kron":
            notes.append(
                "kron: not measured: the torch.func backend forms no Kronecker factors (this "
                "network runs on torch.func; see the backend note), so this measurement has no "
                "kron keys. Use structures=('diag', 'block') to avoid this note."
            )
            continue
        why = "no Kronecker factorisation for " + ", ".join(skipped)
        rest = (
            f"{structure}/all covers the other layers"
            if covered
            else f"no {structure} metrics in this measurement"
        )
        notes.append(f"{structure}: {why}; {rest}")
    if collector.damping_fallback:
        notes.append(
            "relative damping fell back to absolute damping for layers with zero Fisher "
            f"trace: {', '.join(sorted(collector.damping_fallback))}"
        )
    notes += _health_notes(collector)
    return notes


#: A layer whose damped statistics rounding may have moved by more than this gets a note.
HEALTH_LIMIT = 1e-3


def _without_curvature(collector: LayerCollector, name: str) -> bool:
    """Whether the layer's ``F`` and ``EF`` are zero (every entry of their diagonals)."""
    diagonals = collector.diagonals.get(name)
    return diagonals is not None and not bool(diagonals[0].any() or diagonals[1].any())


def _health_notes(collector: LayerCollector) -> list[str]:
    """Name the layers whose numbers rounding may have moved (numerical health).

    The estimate bounds the relative error of the damped statistics (cosines move by about
    as much); it is pessimistic, so a note means "check", not "wrong". A layer without any
    curvature (``diag F = diag EF = 0``: no gradient reached it, e.g. behind a zero-initialised
    normalisation) has nothing for rounding to blur, and its estimate, relative to
    statistics that are zero, means nothing: it gets no note.
    """
    doubtful = []
    for structure, per_layer in collector.results.items():
        for name, result in per_layer.items():
            if result.health is None or _without_curvature(collector, name):
                continue
            error = float(result.health.relative_error)
            if error > HEALTH_LIMIT:
                doubtful.append((structure, name, error))
    return [
        f"{structure}/{name}: the damped metrics may be off by up to {error:.0e} (relative): "
        "float64 Gram matrices cannot resolve this layer's curvature at this damping "
        "(near-duplicate samples, or inputs many orders of magnitude below the bias); "
        "a larger damping or a smaller probe makes it exact again"
        for structure, name, error in doubtful
    ]


def _coverage(
    prepared: Backend,
    result: PassResult,
    estimators: dict[str, str | None],
    collector: LayerCollector,
) -> list[dict]:
    """Per layer: how it was measured (backend, factors) and, per structure, by what.

    A structure that has no form for a layer (``kron`` of a layer without Kronecker
    factors) is ``None`` for it, as is one left out of the whole measurement.
    """
    measured = result.measured
    return [
        {
            "layer": info.name,
            "type": info.module_type,
            "parameters": list(info.parameter_names),
            "dimension": info.dimension,
            "backend": prepared.backend,
            "factors": result.methods.get(info.name),
            "measured": info.name in measured,
            "reason": None if info.name in measured else "no gradient reached it in this pass",
            "estimator": (
                {
                    structure: None if info.name in collector.skipped_layers(structure) else how
                    for structure, how in estimators.items()
                }
                if info.name in measured
                else None
            ),
        }
        for info, _ in prepared.layers
    ]


def _directions(
    collector: LayerCollector, layers: list[LayerInfo]
) -> dict[str, list[dict[str, tuple[Tensor, Tensor]]]]:
    found: dict[str, list[dict[str, tuple[Tensor, Tensor]]]] = {}
    for structure, per_layer in collector.results.items():
        count = len(collector.settings.dampings)
        per_damping: list[dict[str, tuple[Tensor, Tensor]]] = [{} for _ in range(count)]
        for info in layers:
            result = per_layer.get(info.name)
            if result is None or result.directions is None:
                continue
            for index, pair in enumerate(result.directions):
                per_damping[index][info.name] = pair
        found[structure] = per_damping
    return found


__all__ = [
    "MAX_KEPT_BLOCK",
    "LayerCollector",
    "MeasureOptions",
    "exact_only_reason",
    "layer_dampings",
    "measure_once",
    "plan_measurement",
]
