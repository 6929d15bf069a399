"""Whether the issue's targets are met, and the cell texts the tables share.

:func:`check` reads a target's case (or every case, for the cost model's target) from the
results of a run and says what was measured and whether the target is met; the small
formatters (:func:`ratio_text`, :func:`number`, :func:`mark`, :func:`problem`) are the
ones :mod:`benchmarks.tables` writes its cells with.
"""

from __future__ import annotations

from benchmarks.cases import Target


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
