"""Cost of a fisher-monitor measurement at the scale users train (``make bench``).

Runs every case of :mod:`benchmarks.cases` in a fresh process (:mod:`benchmarks.worker`),
prints Markdown tables with the issue's targets next to the measured ratios (✓/✗) and
writes them, with the raw results as JSON, to ``benchmarks/results/``.

How the numbers are made:

- **Ratio to a warm plain step.** Every timed call is preceded by a few plain SGD steps of
  the same model and batch; the first absorbs what the previous call left in the caches,
  the median of the others is the warm step that call is divided by. The ratio of a case
  is the median of these per-call ratios over its repetitions (interleaved: steps,
  ``measure()``, steps, ``Measurer``, steps, ``measure()``, ...).
- **One-shot ``measure()``** prepares the network at every call, as users call it; the
  **prepared ``Measurer``** call reuses it, as the callback does.
- **Callback**: a real ``Trainer.fit`` with ``FisherMonitor`` (default configuration,
  TensorBoardLogger with its histograms and heat map); the cost of a measurement is the
  measured step and the step after it minus two warm Lightning steps of the same run,
  averaged over the measurements after the first, in Lightning training steps.
- **Peak extra memory**: the rise of the process's resident-set high-water mark during the
  call (Linux resets it through ``/proc/self/clear_refs``; CUDA: ``max_memory_allocated``)
  minus the same rise for one plain step: what the measurement adds to training's peak.
- **Limits**: a call longer than ``--limit`` seconds ends its case's repetitions (the
  table says so); a case still running after ``--timeout`` seconds is killed and keeps
  what it had finished; a failing case is recorded with its error and the others go on.

Usage: ``python benchmarks/run.py [--quick] [--cases mlp,resnet18/default,report/*]
[--device cpu|cuda] [--limit 60] [--timeout 100] [--threads N] [--reference]``;
``--list`` shows the cases. ``make bench BENCH_ARGS=--quick`` runs the quick set.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.cases import (  # noqa: E402
    CONFIGS,
    FLOORS,
    MODELS,
    TARGETS,
    Case,
    Target,
    select,
)
from benchmarks.worker import Options, run_case  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
REFERENCE = ROOT / "benchmarks" / "reference"

#: Options of a full run and of ``--quick``.
FULL = Options(limit=60.0, budget=10.0, repeats=9, warm_steps=4, measurements=10, every=6)
QUICK = Options(limit=20.0, budget=1.5, repeats=3, warm_steps=3, measurements=2, every=4)
#: Hard limit of one case (seconds): full run and ``--quick``.
TIMEOUT, QUICK_TIMEOUT = 100.0, 90.0
#: Hard limit of a report case: writing the synthetic run is not part of the report's time.
REPORT_TIMEOUT = 480.0


# --------------------------------------------------------------------------- running


def run_in_process(
    case: Case, options: Options, timeout: float, logs: Path, package: Path | None = None
) -> dict:
    """Run ``case`` in a fresh process; kill it (and its children) after ``timeout``.

    With ``package``, the process imports ``fisher_monitor`` from that checkout instead
    (``--baseline``).
    """
    logs.mkdir(parents=True, exist_ok=True)
    stem = case.name.replace("/", "__") + ("__baseline" if package is not None else "")
    env = dict(os.environ)
    if package is not None:
        env["FISHER_BENCH_PACKAGE"] = str(package)
    with tempfile.TemporaryDirectory(prefix="fisher-bench-case-") as directory:
        spec = Path(directory) / "case.json"
        output = Path(directory) / "result.json"
        spec.write_text(
            json.dumps({"case": case.to_dict(), "options": dataclasses.asdict(options)})
        )
        started = time.perf_counter()
        with (logs / f"{stem}.log").open("w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.worker", str(spec), str(output)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killed with its children
                env=env,
            )
            try:
                process.wait(timeout=timeout)
                killed = False
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                killed = True
        elapsed = time.perf_counter() - started
        result = json.loads(output.read_text()) if output.exists() else case.to_dict()
    result["seconds"] = elapsed
    if killed:
        result["status"] = "timed out"
        phase = result.pop("phase", None)
        running = time.time() - result.pop("phase_time", time.time())
        result["error"] = f"killed after {timeout:.0f} s" + (
            f", {running:.0f} s into {phase}" if phase else ""
        )
        bound = result.get("timing") or {}
        unfinished = result.get(bound.get("kind")) or {}
        if bound.get("step_ms") and not unfinished.get("runs") and phase and "call" in phase:
            # the call ran for `running` seconds at least: its ratio is at least this
            result["lower_bound"] = {
                "kind": bound["kind"],
                "ratio": 1e3 * running / bound["step_ms"],
                "seconds": running,
            }
    elif result.get("status") not in ("ok", "failed"):
        code = process.returncode
        cause = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        if code == -signal.SIGKILL:
            cause += " (out of memory?)"
        result["status"], result["error"] = "failed", f"worker {cause}; see {log.name}"
    return result


def progress_line(result: dict) -> str:
    """One line per finished case, while the run goes on."""
    parts = [f"{result['name']:<32}", f"{result.get('seconds', 0):6.1f} s", result["status"]]
    for kind, label in (("measure", "measure()"), ("measurer", "Measurer"), ("floor", "floor")):
        ratio = (result.get(kind) or {}).get("ratio")
        if ratio is not None:
            parts.append(f"{label} {ratio:.1f}×")
    callback = result.get("callback") or {}
    if callback.get("ratio") is not None:
        parts.append(f"callback {callback['ratio']:.1f} Lightning steps")
    report = result.get("report") or {}
    if report:
        parts.append(f"report {report['seconds']:.1f} s, {report['peak_mb']:.0f} MB")
    fit = result.get("fit") or {}
    if fit.get("monitored_seconds"):
        parts.append(
            f"fit {fit['plain_seconds']:.1f} s -> {fit['monitored_seconds']:.1f} s, "
            f"{fit['measurements']} measurements, reported {fit['reported_seconds']:.2f} s"
        )
    estimate = (result.get("measurement") or {}).get("cost_steps")
    if estimate:
        parts.append(f"model {estimate:.1f}×")
    if result.get("error"):
        parts.append(result["error"])
    return "  ".join(parts)


# --------------------------------------------------------------------------- tables


def ratio_text(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}×"


def number(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def mark(ok: bool | None) -> str:
    return "" if ok is None else ("✓" if ok else "✗")


def problem(result: dict) -> str:
    """``"failed: …"`` / ``"timed out: …"`` for a case that did not finish."""
    if result["status"] == "ok":
        return ""
    return f"{result['status']}: {result.get('error', '')}".replace("|", "\\|")


def bound_text(result: dict, kind: str) -> str:
    """``"> 95× (killed 110 s into the call)"`` for a call the time limit cut short."""
    bound = result.get("lower_bound") or {}
    if bound.get("kind") != kind:
        return ""
    return f"> {bound['ratio']:.0f}× (killed {bound['seconds']:.0f} s into the call)"


def cost_factors(results: dict[str, dict]) -> list[tuple[str, float]]:
    """Per measured case, the cost model's estimate over the measured ``Measurer`` ratio."""
    found = []
    for name, result in results.items():
        estimate = (result.get("measurement") or {}).get("cost_steps")
        measured = (result.get("measurer") or {}).get("ratio")
        if result.get("kind") == "measure" and estimate and measured:
            found.append((name, estimate / measured))
    return found


def check_cost_model(target: Target, results: dict[str, dict]) -> tuple[str, bool | None]:
    """Whether every estimate is within ``target.bound`` of its measurement (either way)."""
    factors = cost_factors(results)
    if not factors:
        return "not run", None
    worst_name, worst = max(factors, key=lambda item: max(item[1], 1 / item[1]))
    low, high = min(f for _, f in factors), max(f for _, f in factors)
    text = (
        f"estimate/measured {low:.2f}–{high:.2f} over {len(factors)} cases "
        f"(worst `{worst_name}`: {worst:.2f})"
    )
    return text, max(worst, 1 / worst) <= target.bound


def check_accounting(target: Target, result: dict | None) -> tuple[str, bool | None]:
    """The monitor's reported seconds against the fit's wall-clock increase."""
    fit = (result or {}).get("fit") or {}
    if fit.get("increase_seconds") is None:
        return ("not run", None) if result is None else (problem(result) or "no fit", False)
    reported, increase = fit["reported_seconds"], fit["increase_seconds"]
    gap = abs(reported - increase) / increase if increase > 0 else float("inf")
    text = (
        f"reported {reported:.2f} s ({100 * (fit['reported_share'] or 0):.1f}%), "
        f"wall-clock increase {increase:.2f} s ({100 * (fit['increase_share'] or 0):.1f}%): "
        f"{100 * gap:.0f}% apart"
    )
    return text, gap <= target.bound


def check_fit(target: Target, result: dict) -> tuple[str, bool | None]:
    """Measurements over the baseline's (same run), within the baseline's share."""
    fit = result.get("fit") or {}
    baseline = (result.get("baseline") or {}).get("fit") or {}
    if not fit.get("measurements"):
        return problem(result) or "no fit", False
    text = f"{fit['measurements']} measurements, share {100 * (fit['reported_share'] or 0):.1f}%"
    if not baseline.get("measurements"):
        return text + " (no baseline: run with --baseline)", None
    factor = fit["measurements"] / baseline["measurements"]
    same_share = (fit["reported_share"] or 0) <= 1.1 * (baseline["reported_share"] or 0)
    text += (
        f" vs {baseline['measurements']} at {100 * (baseline['reported_share'] or 0):.1f}% "
        f"today: {factor:.1f}×"
    )
    return text, factor >= target.bound and same_share


def check(
    target: Target, result: dict | None, results: dict[str, dict] | None = None
) -> tuple[str, bool | None]:
    """The measured value of ``target`` as text, and whether it is met.

    Args:
        target: The target.
        result: Its case's result (``None``: not run).
        results: Every result by case name (for targets reading several cases).
    """
    if target.case == "*":
        return check_cost_model(target, results or {})
    if target.case.endswith("#accounting"):
        return check_accounting(target, (results or {}).get(target.case.split("#")[0]))
    if result is None:
        return "not run", None
    if target.case.startswith("fit/"):
        return check_fit(target, result)
    if target.relative_to is not None:
        return check_relative(target, result, (results or {}).get(target.relative_to))
    failure = problem(result)
    if target.case.startswith("report/"):
        report = result.get("report")
        if not report:
            return failure, False
        met = report["seconds"] <= target.bound and report["peak_mb"] <= (target.megabytes or 1e30)
        return f"{report['seconds']:.1f} s, {report['peak_mb']:.0f} MB", met
    kind = "callback" if target.case.endswith("/callback") else "measure"
    timings = result.get(kind) or {}
    ratio = timings.get("ratio")
    if ratio is None:
        return bound_text(result, kind) or failure or "no timing", False
    parts, met = [ratio_text(ratio)], ratio <= target.bound
    info = result.get("measurement") or {}
    if target.full_probe:
        probe = info.get("probe_batch_size")
        full = not info.get("subsampled", True)
        parts.append("full probe" if full else f"probe {number(probe, 0)} (sub-sampled)")
        met = met and full
    if target.max_relative_se is not None:
        worst = info.get("worst_relative_se")
        if worst is None:
            parts.append("exact values (no estimates)" if info else "no measurement")
            met = met and bool(info)
        else:
            parts.append(f"worst SE {100 * worst:.1f}% ({info.get('worst_se_key')})")
            worst_all = info.get("worst_all_relative_se")
            if worst_all is not None:
                key = info.get("worst_all_se_key")
                parts.append(f"whole network's worst SE {100 * worst_all:.1f}% ({key})")
            met = met and worst <= target.max_relative_se
    if failure:
        parts.append(failure)
    return ", ".join(parts), met


def check_relative(target: Target, result: dict, floor: dict | None) -> tuple[str, bool | None]:
    """The case's ratio over its floor's (both measured in this run)."""
    ratio = (result.get("measure") or {}).get("ratio")
    base = ((floor or {}).get("floor") or {}).get("ratio")
    if ratio is None:
        return problem(result) or "no timing", False
    if base is None:
        return f"{ratio_text(ratio)} (floor `{target.relative_to}` not run)", None
    return f"{ratio_text(ratio)} = {ratio / base:.2f}× the floor's {ratio_text(base)}", (
        ratio / base <= target.bound
    )


def targets_table(results: dict[str, dict]) -> list[str]:
    lines = [
        "## Targets",
        "",
        "| target | case | goal | measured | |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for target in TARGETS:
        measured, met = check(target, results.get(target.case), results)
        if target.case.startswith("report/"):
            goal = f"≤ {target.bound:.0f} s, ≤ {(target.megabytes or 0) / 1024:.0f} GB"
        elif target.case.endswith("#accounting"):
            goal = f"within {100 * target.bound:.0f}%"
        elif target.case.startswith("fit/"):
            goal = f"≥ {target.bound:g}×, same share"
        elif target.relative_to is not None:
            goal = f"≤ {target.bound:g}× `{target.relative_to}`"
        else:
            goal = f"≤ {target.bound:g}×"
        case = target.case.split("#")[0]
        lines.append(f"| {target.label} | `{case}` | {goal} | {measured} | {mark(met)} |")
    return [*lines, ""]


def config_label(config: str) -> str:
    if config not in CONFIGS:
        return config
    structures, fisher = CONFIGS[config]
    if config == "default":
        return f"default ({' + '.join(structures)}, {fisher})"
    return f"{' + '.join(structures)} {fisher}"


def probe_text(spec_batch: int, info: dict) -> str:
    probe = info.get("probe_batch_size")
    if probe is None:
        return ""
    text = f"{probe:.0f}" if probe == spec_batch else f"{probe:.0f} of {spec_batch}"
    return text + (" (sub-sampled)" if info.get("subsampled") else "")


def notes_text(result: dict) -> str:
    info = result.get("measurement") or {}
    parts = []
    if info.get("backends"):
        parts.append("/".join(info["backends"]))
    per_layer = info.get("layer_backends") or {}
    if len(per_layer) == 1:
        backend, layers = next(iter(per_layer.items()))
        parts.append(f"backend per layer: {backend} for all {len(layers)} layers")
    elif per_layer:
        parts.append(
            "backend per layer: "
            + "; ".join(f"{b}: {', '.join(layers)}" for b, layers in per_layer.items())
        )
    if "headline_missing" in info:
        missing = info["headline_missing"]
        parts.append("headline metrics: " + (f"missing {', '.join(missing)}" if missing else "all"))
    solves = info.get("exact_solves")
    if solves:
        parts.append(
            f"exact-Fisher solves: {solves['products']:,} products over {solves['layers']} "
            f"layers, {solves['seconds']:.1f} s"
        )
    if info.get("worst_relative_se") is not None:
        parts.append(f"worst SE {100 * info['worst_relative_se']:.1f}%")
    for kind in ("measure", "measurer", "floor", "callback"):
        timings = result.get(kind) or {}
        if timings.get("stopped"):
            parts.append(f"{kind}: {timings['stopped']}")
        if timings.get("runs"):
            parts.append(f"{kind} runs {timings['runs']}")
    parts += info.get("notes", [])[:2]
    return "; ".join(parts).replace("|", "\\|").replace("\n", " ")


def goal_text(target: Target | None) -> str:
    if target is None:
        return ""
    if target.relative_to is not None:
        return f"≤ {target.bound:g}× floor"
    return f"≤ {target.bound:g}×"


def model_text(result: dict) -> str:
    """``"41.2× (1.08)"``: the cost model's estimate, and over the measured ``Measurer`` ratio."""
    estimate = (result.get("measurement") or {}).get("cost_steps")
    measured = (result.get("measurer") or {}).get("ratio")
    if result.get("kind") != "measure" or not estimate:
        return ""
    return f"{estimate:.1f}×" + (f" ({estimate / measured:.2f})" if measured else "")


def today_text(result: dict, kind: str) -> str:
    """The same case's ratio on the baseline checkout (``--baseline``), same run."""
    baseline = result.get("baseline") or {}
    timings = baseline.get("floor" if kind == "floor" else kind) or {}
    if timings.get("ratio") is None:
        return problem(baseline) if baseline else ""
    return ratio_text(timings["ratio"])


def model_table(name: str, rows: list[dict]) -> list[str]:
    """One model's rows: configurations, callback, floors."""
    spec = MODELS[name]
    targets = {t.case: t for t in TARGETS}
    steps = [
        r[kind]["step_ms"]
        for r in rows
        for kind in ("measure", "floor")
        if (r.get(kind) or {}).get("step_ms") is not None
    ]
    peaks = [r["step_peak_mb"] for r in rows if r.get("step_peak_mb") is not None]
    setup = next((r["setup"] for r in rows if r.get("setup")), {})
    header = f"## {spec.title}"
    facts = []
    if setup.get("parameters"):
        facts.append(f"{setup['parameters']:,} parameters")
    if steps:
        facts.append(f"warm plain SGD step {statistics.median(steps):.2f} ms")
    if peaks:
        facts.append(
            f"a plain step peaks {statistics.median(peaks):.0f} MB above the resident memory "
            "(subtracted from the extra MB)"
        )
    if "fitted_in_steps" in setup:
        facts.append(
            f"fitted in {setup['fitted_in_steps']} Adam steps to loss {setup['fitted_loss']:.1e}"
        )
    lines = [
        header,
        "",
        "; ".join(facts) + "." if facts else "",
        "",
        "| case | `measure()` ms | × step | goal | | `Measurer` ms | × step | extra MB "
        "`measure()` / `Measurer` | probe | cost model × step (estimate/measured) "
        "| today × step (`--baseline`) | notes |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    by_name = {r["name"]: r for r in rows}
    for result in rows:
        case = result["name"]
        target = targets.get(case)
        kind = result["kind"]
        failure = problem(result)
        if kind == "measure":
            label = config_label(result["what"])
            first, second = result.get("measure") or {}, result.get("measurer") or {}
            memory = " / ".join(
                number(result.get(f"{k}_peak_mb"), 0) or "–" for k in ("measure", "measurer")
            )
        elif kind == "floor":
            names = " + ".join(FLOORS[result["what"]][0])
            label = f"floor: BackPACK {names}"
            first, second = result.get("floor") or {}, {}
            memory = number(result.get("floor_peak_mb"), 0)
        else:
            callback = result.get("callback") or {}
            step = callback.get("step_ms")
            label = "callback, default, with its logging (× Lightning step" + (
                f" of {step:.2f} ms)" if step else ")"
            )
            first, second, memory = callback, {}, ""
        ratio = first.get("ratio")
        met = check(target, result, by_name)[1] if target is not None else None  # all conditions
        bound = result.get("lower_bound") or {}
        timed = first.get("ms") is not None
        if not timed and bound.get("kind") in ("measure", "floor"):
            first_ms = f"> {1e3 * bound['seconds']:,.0f}"
            ratio_cell = f"> {bound['ratio']:.0f}×"
        else:
            first_ms = number(first.get("ms")) if timed else failure
            ratio_cell = ratio_text(ratio)
        cells = [
            label,
            first_ms,
            ratio_cell,
            goal_text(target),
            mark(met),
            number(second.get("ms")),
            ratio_text(second.get("ratio")),
            memory,
            probe_text(spec.batch_size, result.get("measurement") or {}),
            model_text(result),
            today_text(result, kind),
            "; ".join(
                part
                for part in (notes_text(result), failure if first_ms != failure else "")
                if part
            ),
        ]
        if kind == "callback" and (result.get("callback") or {}).get("first_ms") is not None:
            callback = result["callback"]
            cells[-1] = (
                f"{callback['runs']} measurements every {callback['every']} steps (heat map "
                f"every 10th); the first costs {callback['first_ms'] / callback['step_ms']:.0f} "
                f"steps; median {callback.get('median_ratio') or 0:.1f}; " + cells[-1]
            )
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def fit_table(rows: list[dict]) -> list[str]:
    """The fits: measurements, reported share and wall-clock increase, beside today's."""
    lines = [
        "## Fits with a default `FisherMonitor()` (Adam, batch 64, TensorBoardLogger)",
        "",
        "| fit | plain fit | with the monitor | measurements | reported share | wall-clock "
        "increase | today: measurements, share, increase (`--baseline`) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for result in rows:
        fit = result.get("fit") or {}
        if not fit.get("monitored_seconds"):
            lines.append(f"| `{result['name']}` | {problem(result)} | | | | | |")
            continue
        base = (result.get("baseline") or {}).get("fit") or {}
        today = ""
        if base.get("monitored_seconds"):
            today = (
                f"{base['measurements']}, {100 * (base['reported_share'] or 0):.1f}%, "
                f"{100 * (base['increase_share'] or 0):.1f}%"
            )
        cells = [
            f"`{result['name']}`: {fit['title']}",
            f"{fit['plain_seconds']:.1f} s",
            f"{fit['monitored_seconds']:.1f} s",
            str(fit["measurements"]),
            f"{100 * (fit['reported_share'] or 0):.1f}% ({fit['reported_seconds']:.2f} s)",
            f"{100 * (fit['increase_share'] or 0):.1f}% ({fit['increase_seconds']:.2f} s)",
            today,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def report_table(rows: list[dict]) -> list[str]:
    from benchmarks.report_scale import report_label

    lines = [
        "## Report at scale (`benchmarks/report_scale.py`)",
        "",
        "| run | events | report time | peak memory | goal | |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    goals = {t.case: t for t in TARGETS}
    for result in rows:
        report = result.get("report") or {}
        target = goals.get(result["name"])
        if report:
            met = None
            if target is not None:
                met = report["seconds"] <= target.bound and report["peak_mb"] <= (
                    target.megabytes or 1e30
                )
            goal = (
                f"≤ {target.bound:.0f} s, ≤ {(target.megabytes or 0) / 1024:.0f} GB"
                if target
                else ""
            )
            cells = [
                f"{report['events_mb']:.0f} MB",
                f"{report['seconds']:.1f} s",
                f"{report['peak_mb']:.0f} MB",
                goal,
                mark(met),
            ]
        else:
            cells = [problem(result), "", "", "", "✗" if target else ""]
        lines.append(f"| {report_label(result['what'])} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def machine_line(device: str, threads: int = 0) -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{platform.machine()}, {cpus} CPU cores, torch {torch.__version__} "
    text += f"with {threads or torch.get_num_threads()} threads"
    if device == "cuda" and torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def load_lines(results: list[dict]) -> list[str]:
    """The 1-minute load averages seen during the run, with a warning on a busy machine."""
    loads = [value for result in results for value in result.get("load", [])]
    if not loads:
        return []
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    line = (
        f"- Load average (1 min) at the cases' starts and ends: {min(loads):.1f}–{max(loads):.1f}"
    )
    line += f" on {cpus} cores."
    if max(loads) > 1.5 * (cpus or 1):
        line += (
            " **The machine was busy with other work: the times are inflated and the ratios "
            "unreliable (both the calls and the steps slow down, not by the same factor).**"
        )
    return [line]


def commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "fisher_monitor"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head} (fisher_monitor/ with uncommitted changes)" if dirty else head


def render(results: list[dict], args: argparse.Namespace, seconds: float) -> str:
    by_name = {r["name"]: r for r in results}
    lines = [
        f"# fisher-monitor benchmark ({args.device}{', quick' if args.quick else ''})",
        "",
        f"- {machine_line(args.device, args.threads)}; commit {commit()}; "
        f"{datetime.date.today().isoformat()}; {len(results)} cases in {seconds / 60:.1f} min.",
        "- Ratios: each call over the median of the warm plain SGD steps (same model and "
        "batch) run just before it, median over the repetitions; `measure()` prepares the "
        "network at each call, `Measurer` reuses a prepared one (as the callback does).",
        "- Extra MB: rise of the resident-set high-water mark during the call "
        "(reset through `/proc/self/clear_refs`; CUDA: `max_memory_allocated`) minus the "
        "same for one plain step, in a fresh process per case.",
        f"- Limits: a call over {args.limit:.0f} s ends its case's repetitions; a case is "
        f"killed after {args.timeout:.0f} s (report cases: {REPORT_TIMEOUT:.0f} s) and keeps "
        "what it had finished.",
        *load_lines(results),
        "",
        *targets_table(by_name),
    ]
    models: dict[str, list[dict]] = {}
    reports, fits = [], []
    for result in results:
        if result["kind"] == "report":
            reports.append(result)
        elif result["kind"] == "fit":
            fits.append(result)
        else:
            models.setdefault(result["model"], []).append(result)
    for name, rows in models.items():
        lines += model_table(name, rows)
    if fits:
        lines += fit_table(fits)
    if reports:
        lines += report_table(reports)
    return "\n".join(lines)


def output_name(device: str) -> str:
    """``bench-cpu-2core`` or ``bench-cuda-<gpu>``: the file name of this machine's tables."""
    if device == "cuda" and torch.cuda.is_available():
        words = torch.cuda.get_device_name().replace("NVIDIA", "").split()
        gpu = words[0].lower() if words else "gpu"  # "NVIDIA H100 80GB HBM3" -> "h100"
        return f"bench-cuda-{gpu}"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"bench-cpu-{cpus}core"


def main(argv: list[str] | None = None) -> int:
    """Run the chosen cases, print and write the tables.

    Returns:
        0 (a case that fails or misses its target is a result, not an error of the run).
    """
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the MLP, its callback and a small report, few repeats (about a minute)",
    )
    parser.add_argument(
        "--cases",
        default=None,
        help="comma-separated case names or patterns, e.g. 'mlp,resnet18/default,report/*'",
    )
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--limit",
        type=float,
        default=None,
        help="seconds: a longer call ends its case's repetitions",
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds: a case running longer is killed"
    )
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds of repetitions per case"
    )
    parser.add_argument("--repeats", type=int, default=None, help="most repetitions per case")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads in each case (default: torch's)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="Markdown file (default: benchmarks/results/<machine>.md)",
    )
    parser.add_argument(
        "--reference", action="store_true", help="also copy the tables to benchmarks/reference/"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="also run every case on the fisher_monitor package under this directory (e.g. "
        "a checkout of main): the tables show its ratios beside this one's, same run",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run cases in this process (no isolation; for tests)",
    )
    args = parser.parse_args(argv)
    try:
        cases = select(args.cases, args.quick)
    except ValueError as error:
        parser.error(str(error))
    if args.list:
        print("\n".join(case.name for case in cases))
        return 0
    base = QUICK if args.quick else FULL
    overrides = {"device": args.device, "threads": args.threads}
    for name in ("limit", "budget", "repeats"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    options = dataclasses.replace(base, **overrides)
    args.limit = options.limit
    args.timeout = args.timeout or (QUICK_TIMEOUT if args.quick else TIMEOUT)
    output = args.output or RESULTS / f"{output_name(args.device)}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    logs = output.parent / f"{output.stem}-logs"
    machine = machine_line(args.device, args.threads)
    print(f"fisher-monitor benchmark: {len(cases)} cases on {machine}", flush=True)
    started = time.perf_counter()
    results = []
    for index, case in enumerate(cases, 1):
        print(f"[{index}/{len(cases)}] {case.name} ...", flush=True)
        if args.in_process:
            case_start = time.perf_counter()
            result = run_case(case.to_dict(), options)
            result["seconds"] = time.perf_counter() - case_start
        else:
            long = case.kind in ("report", "fit")
            limit = max(args.timeout, REPORT_TIMEOUT) if long else args.timeout
            result = run_in_process(case, options, limit, logs)
            if args.baseline is not None and case.kind != "report":
                result["baseline"] = run_in_process(case, options, limit, logs, args.baseline)
                print("    today: " + progress_line(result["baseline"]), flush=True)
        results.append(result)
        print("    " + progress_line(result), flush=True)
    text = render(results, args, time.perf_counter() - started)
    print()
    print(text)
    output.write_text(text + "\n")
    output.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    written = [output, output.with_suffix(".json")]
    if args.reference:
        REFERENCE.mkdir(parents=True, exist_ok=True)
        copy = REFERENCE / f"{output_name(args.device)}.md"
        copy.write_text(text + "\n")
        written.append(copy)
    print(
        "wrote "
        + ", ".join(
            str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
            for path in written
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
