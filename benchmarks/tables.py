"""The Markdown tables of ``make bench``: targets, models, fits and reports.

Each function returns the lines of one table (with its heading and a blank line after
it); :func:`benchmarks.run.render` puts them together with the run's facts.
"""

from __future__ import annotations

import statistics

from benchmarks.cases import CONFIGS, FLOORS, MODELS, TARGETS, ModelSpec, Target
from benchmarks.checks import check, mark, number, problem, ratio_text


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


def model_facts(rows: list[dict]) -> list[str]:
    """Parameters, warm plain step, a plain step's own peak, fitting: the model's facts."""
    steps = [
        r[kind]["step_ms"]
        for r in rows
        for kind in ("measure", "floor")
        if (r.get(kind) or {}).get("step_ms") is not None
    ]
    peaks = [r["step_peak_mb"] for r in rows if r.get("step_peak_mb") is not None]
    setup = next((r["setup"] for r in rows if r.get("setup")), {})
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
    return facts


def row_timings(result: dict) -> tuple[str, dict, dict, str]:
    """``(label, first timings, second timings, extra-memory cell)`` of a model's row."""
    kind = result["kind"]
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
    return label, first, second, memory


def model_row(
    result: dict, spec: ModelSpec, target: Target | None, by_name: dict[str, dict]
) -> str:
    """One case's row of its model's table."""
    kind = result["kind"]
    failure = problem(result)
    label, first, second, memory = row_timings(result)
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
            part for part in (notes_text(result), failure if first_ms != failure else "") if part
        ),
    ]
    if kind == "callback" and (result.get("callback") or {}).get("first_ms") is not None:
        callback = result["callback"]
        cells[-1] = (
            f"{callback['runs']} measurements every {callback['every']} steps (heat map "
            f"every 10th); the first costs {callback['first_ms'] / callback['step_ms']:.0f} "
            f"steps; median {callback.get('median_ratio') or 0:.1f}; " + cells[-1]
        )
    return "| " + " | ".join(cells) + " |"


def model_table(name: str, rows: list[dict]) -> list[str]:
    """One model's rows: configurations, callback, floors."""
    spec = MODELS[name]
    targets = {t.case: t for t in TARGETS}
    facts = model_facts(rows)
    lines = [
        f"## {spec.title}",
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
        lines.append(model_row(result, spec, targets.get(result["name"]), by_name))
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
