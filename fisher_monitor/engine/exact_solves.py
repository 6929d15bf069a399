"""Exact-Fisher solves after a sketched pass: the Fisher-inverse metrics of ``block``.

Under a sketch the ``block`` structure defers ``kl``, ``direction_cosine``,
``nat_grad_cosine`` and ``nat_projection`` (:mod:`fisher_monitor.structures.fisher_solves`).
This step finishes them from the **exact** Fisher, matrix-free, once the backend's pass is
over. Per layer ``b`` and damping ``λ`` (every replicate's, so the jackknife still covers
the damping's noise), with ``A = F_b + λI``:

- ``A⁻¹g`` by conjugate gradients on exact Fisher-vector products
  (:mod:`~fisher_monitor.engine.fisher_operator`), to the relative residual
  :attr:`SolveSettings.tolerance`, checked afterwards with a recomputed residual; all
  dampings come from one Krylov run (multi-shift, :mod:`fisher_monitor.krylov`).
  Deterministic up to that tolerance: ``‖x − A⁻¹g‖ ≤ ‖r‖/λ``.
- ``tr(EF_b A⁻¹) = (1/N) Σ_n g_nᵀA⁻¹g_n``: one Krylov run per sample (Gauss quadrature of
  ``1/(t + λ)``, each to a relative error of :attr:`SolveSettings.trace_tolerance`) up to
  :attr:`SolveSettings.exact_samples` samples, else a Hutchinson estimate over Rademacher
  combinations of the samples.
- ``log det(I + F_b/λ) − tr(F_b A⁻¹)`` by stochastic Lanczos quadrature with
  :attr:`SolveSettings.probes` Rademacher probes, whose variance enters ``block/kl_se``.

A layer with at most :attr:`SolveSettings.dense_limit` parameters is cheaper exactly: its
``F_b`` from ``D_b`` products (one batch) and one eigendecomposition give every quantity
exactly, the KL without probes.

The note says how the metrics were obtained and what they cost; a layer whose solves do
not converge within :attr:`SolveSettings.max_iterations` leaves its metrics (and those of
``all``) out, with a note, rather than reporting them wrong. See
``docs/theory.md#matrix-free``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fisher_monitor import keys
from fisher_monitor.backends import Backend
from fisher_monitor.engine.fisher_operator import FOLD_AGREEMENT, NetworkFunction
from fisher_monitor.engine.solve_settings import (
    DEFAULT_SOLVES,
    OverBudget,
    PlannedLayer,
    SolveMeter,
    SolveSettings,
)
from fisher_monitor.krylov import (
    ENERGY,
    RESIDUAL,
    TRACE,
    KrylovResult,
    Operator,
    rademacher,
    shifted_conjugate_gradients,
    true_residuals,
)
from fisher_monitor.linalg import single_threaded
from fisher_monitor.structures import LayerResult
from fisher_monitor.structures.fisher_solves import (
    DeferredResult,
    LayerSolutions,
    ShiftSolution,
    SolvedResult,
    SolveRequest,
)
from fisher_monitor.validation import format_names, format_steps

#: Layers whose products touch at most this many numbers per batched call are solved on one
#: CPU thread: their many small operations are dominated by the thread pool's latency (a
#: 1000-class head: six times faster on two cores).
SINGLE_THREAD_ELEMENTS = 2**22
#: The note of a network with random modules in train mode (nothing solved).
RANDOM_NOTE = (
    "block: kl, direction_cosine, nat_grad_cosine and nat_projection are left out under the "
    "sketch: the network draws random masks in train mode (dropout), which the exact-Fisher "
    "products cannot reproduce as the measurement's pass drew them (docs/theory.md#matrix-free)"
)
#: A recomputed residual may exceed the recursion's by this factor (rounding drift).
RESIDUAL_DRIFT = 10.0


@dataclass
class SolveReport:
    """What the solves of one measurement did, for the notes and the settings.

    Attributes:
        settings: The settings they ran with.
        layers: Layers solved.
        products: Fisher-vector products in all.
        iterations: The most products one right-hand side took.
        seconds: Wall time.
        error_bound: The largest bound on the relative error of ``A⁻¹g``.
        failed_directions: Layers whose ``A⁻¹g`` did not converge.
        failed_traces: Layers whose trace probes did not converge.
        notes: Further notes (precision, failures).
        random: Nothing was solved: the network draws random masks in train mode
            (:meth:`~fisher_monitor.engine.fisher_operator.NetworkFunction.draws_differently`).
        over_budget: Nothing was solved: the projected seconds exceed the budget
            (:class:`SolveMeter`).
        stopped: Layers left unsolved because the solves ran out of their budget.
        step_seconds: A plain training step's measured seconds (the budget's unit; 0 when
            the solves ran unmetered).
        projected: Seconds the solves were projected to take before they ran.
    """

    settings: SolveSettings
    layers: int = 0
    products: int = 0
    iterations: int = 0
    seconds: float = 0.0
    error_bound: float = 0.0
    failed_directions: list[str] = field(default_factory=list)
    failed_traces: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    random: bool = False
    over_budget: bool = False
    stopped: list[str] = field(default_factory=list)
    step_seconds: float = 0.0
    projected: float = 0.0

    def as_dict(self) -> dict:
        """Plain data for :attr:`Measurement.settings` (``estimator.exact_solves``)."""
        return {
            "method": "conjugate gradients and stochastic Lanczos quadrature",
            "tolerance": self.settings.tolerance,
            "trace_tolerance": self.settings.trace_tolerance,
            "probes": self.settings.probes,
            "layers": self.layers,
            "products": self.products,
            "max_iterations_used": self.iterations,
            "seconds": round(self.seconds, 3),
            "error_bound": self.error_bound,
            **({"left_out": "random masks in train mode"} if self.random else {}),
            **(
                {
                    "budget_steps": self.settings.budget_steps,
                    "projected_steps": round(self.in_steps(self.projected)),
                }
                if self.step_seconds
                else {}
            ),
            **({"left_out": "over budget"} if self.over_budget else {}),
            **({"stopped": list(self.stopped)} if self.stopped else {}),
        }

    def in_steps(self, seconds: float) -> float:
        """``seconds`` in plain training steps (of :attr:`step_seconds`)."""
        return seconds / self.step_seconds


def solve_deferred(
    prepared: Backend,
    inputs,
    results: Mapping[str, dict[str, LayerResult]],
    seed: int,
    settings: SolveSettings,
    planned: Mapping[str, PlannedLayer] | None = None,
) -> SolveReport | None:
    """Finish every deferred result in ``results`` (in place) with exact-Fisher solves.

    Args:
        prepared: The prepared backend (its network, likelihood and output adapter).
        inputs: The probe batch's inputs (the same samples as the pass).
        results: Per structure and layer, the pass's results.
        seed: The measurement's seed (dropout masks and probes).
        settings: How to solve.
        planned: The cost model's figures per layer: with them, :class:`SolveMeter` times
            the products, and solves projected or found to exceed
            :attr:`SolveSettings.budget_steps` training steps are left out; ``None``:
            unmetered.

    Returns:
        What was done, or ``None`` when nothing was deferred.
    """
    deferred = [
        (structure, name, result)
        for structure, per_layer in results.items()
        for name, result in per_layer.items()
        if isinstance(result, DeferredResult)
    ]
    if not deferred:
        return None
    start = time.perf_counter()
    report = SolveReport(settings)
    function = NetworkFunction(prepared, inputs, seed)
    report.notes += function.notes
    if function.draws_differently():
        report.random = True
        for structure, name, result in deferred:
            if result.request is not None:
                results[structure][name] = result.complete(_unavailable(result.request))
        function.close()
        report.seconds = time.perf_counter() - start
        return report
    generator = torch.Generator().manual_seed(seed % 2**63)
    try:
        if planned is not None and math.isfinite(settings.budget_steps):
            _meter(function, deferred, planned, settings, report)
        for structure, name, result in deferred:
            request = result.request
            if request is None:
                continue
            if report.over_budget or report.stopped:
                results[structure][name] = result.complete(_unavailable(request))
                if not report.over_budget:
                    report.stopped.append(name)
                continue
            lanes = sum(settings.right_hand_sides(request.per_sample.shape[0]))
            work = (function.outputs.numel() + request.gradient.numel()) * lanes
            try:
                with single_threaded(function.device, work <= SINGLE_THREAD_ELEMENTS):
                    solutions, bound = _solve(function, request, settings, generator)
            except OverBudget:
                results[structure][name] = result.complete(_unavailable(request))
                report.stopped.append(name)
                continue
            results[structure][name] = result.complete(solutions)
            _record(report, f"{structure}/{name}", solutions, bound)
    finally:
        function.close()
    report.seconds = time.perf_counter() - start
    return report


def _meter(
    function: NetworkFunction,
    deferred: list[tuple[str, str, DeferredResult]],
    planned: Mapping[str, PlannedLayer],
    settings: SolveSettings,
    report: SolveReport,
) -> None:
    """Project the solves' seconds (all left out beyond the budget), then watch the deadline."""
    started = time.perf_counter()
    report.step_seconds = function.step_seconds()
    budget = settings.budget_steps * report.step_seconds
    requests = {name: r.request for _, name, r in deferred if r.request is not None}
    report.projected = SolveMeter.projected_seconds(function, requests, planned, settings, budget)
    report.over_budget = report.projected > budget
    if not report.over_budget:  # the timing counts against the budget too
        function.meter = SolveMeter(budget - (time.perf_counter() - started)).check


def _solve(
    function: NetworkFunction,
    request: SolveRequest,
    settings: SolveSettings,
    generator: torch.Generator,
) -> tuple[LayerSolutions, float]:
    """A softmax head exactly (:mod:`~fisher_monitor.engine.softmax_head`), else by products.

    The head's structure is used only where the layer's plain products agree with it on a
    random vector (a tied embedding's do not).
    """
    names = function.names_of(request.info.parameter_names)
    head = function.softmax_head(settings.lane_bytes) if settings.exact_head else None
    operator = function.operator(request.info.parameter_names, settings.lane_bytes)
    if head is not None and head.covers(names) is not None:
        agreement = FOLD_AGREEMENT if function.dtype == torch.float64 else 1e-4
        if head.agrees(operator, names, agreement):
            return head.solve(request, names), 0.0
    return solve_layer(operator, request, settings, generator)


def _unavailable(request: SolveRequest) -> LayerSolutions:
    """Solutions that leave every Fisher-inverse metric out (nothing was solved)."""
    zero = request.gradient.new_zeros(1)
    shift = ShiftSolution(None, zero[0], 0.0, zero, zero, zero)
    found = {float(s): shift for s in request.shifts}
    return LayerSolutions(found, False, False, iterations=0, products=0)


def _record(report: SolveReport, where: str, solutions: LayerSolutions, bound: float) -> None:
    report.layers += 1
    report.products += solutions.products
    report.iterations = max(report.iterations, solutions.iterations)
    if solutions.directions_converged:
        report.error_bound = max(report.error_bound, bound)
    else:
        report.failed_directions.append(where)
    if not solutions.traces_converged:
        report.failed_traces.append(where)


def solve_layer(
    operator: Operator,
    request: SolveRequest,
    settings: SolveSettings,
    generator: torch.Generator,
) -> tuple[LayerSolutions, float]:
    """The exact-Fisher solves of one layer (module docstring).

    Right-hand sides: ``g``; the samples ``g_n/√N`` (or ``probes`` Rademacher combinations
    of them); ``probes`` Rademacher vectors ``z``. One multi-shift Krylov run serves all.

    Returns:
        The solutions and the largest bound on the relative error of ``A⁻¹g``.
    """
    gradient, rows = request.gradient, request.per_sample
    samples, dimension = rows.shape
    if dimension <= settings.dense_limit:
        return dense_solutions(operator, request)
    exact = samples <= settings.exact_samples
    weights = (
        torch.eye(samples, dtype=rows.dtype, device=rows.device)
        if exact
        else rademacher(settings.probes, samples, generator, rows)
    )
    probes = rademacher(settings.probes, dimension, generator, rows)
    starts = torch.cat([gradient.unsqueeze(0), (weights @ rows) * samples**-0.5, probes])
    solved = 1 + weights.shape[0]
    tolerances = torch.full((starts.shape[0],), settings.trace_tolerance, dtype=rows.dtype)
    tolerances[0] = settings.tolerance
    rules = torch.full((starts.shape[0],), TRACE)
    rules[0], rules[1:solved] = RESIDUAL, ENERGY
    result = shifted_conjugate_gradients(
        operator,
        starts,
        request.shifts,
        keep=1,
        tolerances=tolerances.to(rows.device),
        max_iterations=settings.max_iterations,
        rules=rules.to(rows.device),
    )
    residual = true_residuals(operator, result, starts)[0]
    norm = gradient.norm()
    directions = bool(result.converged[0]) and bool(
        (residual <= RESIDUAL_DRIFT * settings.tolerance * norm).all()
    )
    traces = bool(result.converged[1:].all())
    if not (directions and traces) and dimension <= settings.dense_fallback:
        return dense_solutions(operator, request)  # exact where conjugate gradients stalled
    shifts, bound = _shift_solutions(result, gradient, residual, (1, solved), exact, directions)
    return (
        LayerSolutions(
            shifts,
            directions_converged=directions,
            traces_converged=traces,
            iterations=int(result.iterations.max()),
            products=result.products + result.shifts.numel(),
        ),
        bound,
    )


def dense_solutions(operator: Operator, request: SolveRequest) -> tuple[LayerSolutions, float]:
    """Every quantity exactly, from ``F_b`` formed by ``D_b`` products (small layers).

    With ``F_b = Q diag(σ) Qᵀ``: ``A⁻¹g = Q (Qᵀg)/(σ + λ)``, ``tr h(F_b) = Σ h(σ_i)`` and
    ``tr(EF_b A⁻¹) = (1/N) Σ_n ‖(Qᵀg_n)/√(σ + λ)‖²``. The error bound is rounding's,
    ``ε (σ_max + λ)/λ``.
    """
    gradient, rows = request.gradient, request.per_sample
    dimension = rows.shape[1]
    fisher = operator(torch.eye(dimension, dtype=rows.dtype, device=rows.device))
    values, vectors = torch.linalg.eigh(0.5 * (fisher + fisher.T))
    values = values.clamp_min(0.0)
    coordinates, samples = vectors.T @ gradient, rows @ vectors
    found, largest = {}, 0.0
    eps = torch.finfo(rows.dtype).eps
    zero = values.new_zeros(1)
    for shift in request.shifts:
        inverse = 1.0 / (values + shift)
        bound = eps * float(values.max() + shift) / shift
        largest = max(largest, bound)
        spectral = (torch.log1p(values / shift) - values * inverse).sum()
        found[float(shift)] = ShiftSolution(
            direction=vectors @ (coordinates * inverse),
            projection=(coordinates.square() * inverse).sum(),
            error_bound=bound,
            spectral=spectral.reshape(1),
            spectral_square=zero,
            empirical=((samples.square() * inverse).sum() / rows.shape[0]).reshape(1),
        )
    solutions = LayerSolutions(found, True, True, iterations=1, products=dimension)
    return solutions, largest


def _shift_solutions(
    result: KrylovResult,
    gradient: Tensor,
    residual: Tensor,
    sample_lanes: tuple[int, int],
    exact: bool,
    directions: bool,
) -> tuple[dict[float, ShiftSolution], float]:
    """Per damping: ``A⁻¹g``, ``gᵀA⁻¹g`` and the quadratures of the trace terms."""
    shifts = [float(s) for s in result.shifts]
    first, stop = sample_lanes
    inverse = [_inverse(s) for s in shifts]
    spectral = [_spectral(s) for s in shifts]
    squares = [_squared(s) for s in shifts]
    per_sample = torch.stack([result.quadrature(j, inverse) for j in range(first, stop)])
    probes = torch.stack(
        [result.quadrature(j, spectral + squares) for j in range(stop, len(result.diagonals))]
    )
    count, found, largest = len(shifts), {}, 0.0
    for index, shift in enumerate(shifts):
        x = result.solutions[0, index]
        size = float(x.norm())
        bound = float(residual[index]) / (shift * size) if size > 0 else 0.0
        largest = max(largest, bound)
        empirical = per_sample[:, index]
        found[shift] = ShiftSolution(
            direction=x if directions else None,
            projection=gradient @ x,
            error_bound=bound,
            spectral=probes[:, index],
            spectral_square=probes[:, count + index],
            empirical=empirical.sum().reshape(1) if exact else empirical,
            empirical_exact=exact,
        )
    return found, largest


def _inverse(shift: float):
    return lambda t: 1.0 / (t + shift)


def _spectral(shift: float):
    """``h(t) = log(1 + t/λ) − t/(t + λ)`` (≥ 0, ``h(0) = 0``)."""
    return lambda t: torch.log1p(t / shift) - t / (t + shift)


def _squared(shift: float):
    h = _spectral(shift)
    return lambda t: h(t).square()


# --------------------------------------------------------------------- standard errors
def add_probe_errors(
    scalars: dict[str, float],
    structure: str,
    layer: str,
    results: list[LayerResult],
    dampings: list[float],
) -> None:
    """Add the trace probes' variance of the KL to its standard error (in quadrature).

    The jackknife's ``{structure}/kl_se`` covers the damping's noise (every replicate uses
    the same probes); the probes are independent across layers, so their variances add.
    """
    solved = [r for r in results if isinstance(r, SolvedResult) and r.kl_variance]
    if not solved:
        return
    several = len(dampings) > 1
    for index, damping in enumerate(dampings):
        variances = [r.kl_variance[index] for r in solved]
        if any(v is None for v in variances):
            continue
        suffix = keys.damping_suffix(damping, several)
        if keys.metric_key(structure, "kl", layer, suffix) not in scalars:
            continue
        key = keys.stderr_key(structure, "kl", layer, suffix)
        probes = float(sum(variances))
        if probes > 0.0:  # exact traces (small layers solved densely) add nothing
            scalars[key] = math.sqrt(probes + scalars.get(key, 0.0) ** 2)


# ------------------------------------------------------------------------------- notes
def solve_notes(report: SolveReport) -> list[str]:
    """What the measurement's notes say about the solves."""
    s = report.settings
    if report.random:
        return [RANDOM_NOTE, *report.notes]
    notes = [
        "block: kl, direction_cosine, nat_grad_cosine and nat_projection from the exact "
        f"Fisher by matrix-free solves: conjugate gradients to relative residual "
        f"{s.tolerance:g} (largest bound on the relative error of A⁻¹g: "
        f"{report.error_bound:.0e}) and Lanczos quadrature to {s.trace_tolerance:g} with "
        f"{s.probes} random probes per layer for the KL (its standard error under "
        "block/kl_se); "
        f"{report.products:,} Fisher-vector products over {report.layers} layers, at most "
        f"{report.iterations} per right-hand side, {report.seconds:.1f} s "
        "(docs/theory.md#matrix-free)"
    ]
    step = f"training steps of {report.step_seconds * 1e3:.3g} ms"
    budget = f"solve_budget {format_steps(s.budget_steps)}; a larger solve_budget runs them"
    if report.over_budget:
        projected = format_steps(report.in_steps(report.projected))
        return [
            "block: kl, direction_cosine, nat_grad_cosine and nat_projection are left out "
            "under the sketch: at the measured pace of their Fisher-vector products, the "
            f"exact-Fisher solves would need at least {projected} {step} ({budget}; "
            "docs/theory.md#matrix-free)",
            *report.notes,
        ]
    notes += report.notes
    if report.stopped:
        notes.append(
            f"block: the exact-Fisher solves ran out of their budget after "
            f"{report.seconds:.1f} s ({format_steps(report.in_steps(report.seconds))} {step}; "
            f"{budget}): kl, direction_cosine, nat_grad_cosine and nat_projection are left "
            f"out for {format_names(report.stopped)} and for all (docs/theory.md#matrix-free)"
        )
    if report.failed_directions:
        notes.append(
            f"block: conjugate gradients did not reach relative residual {s.tolerance:g} within "
            f"{s.max_iterations} products for {', '.join(report.failed_directions)}: "
            "direction_cosine, nat_grad_cosine and nat_projection are left out there and "
            "for all (a larger damping converges faster)"
        )
    if report.failed_traces:
        notes.append(
            f"block: the KL's trace probes did not converge within {s.max_iterations} "
            f"products for {', '.join(report.failed_traces)}: kl is left out there and "
            "for all"
        )
    return notes


__all__ = [
    "DEFAULT_SOLVES",
    "SolveReport",
    "SolveSettings",
    "add_probe_errors",
    "dense_solutions",
    "solve_deferred",
    "solve_layer",
    "solve_notes",
]
