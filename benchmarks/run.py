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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.cases import LONG_MODELS, Case, select  # noqa: E402
from benchmarks.checks import check as check  # noqa: E402  (re-exported)
from benchmarks.tables import (  # noqa: E402
    fit_table,
    model_table,
    report_table,
    targets_table,
)
from benchmarks.worker import Options, run_case  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
REFERENCE = ROOT / "benchmarks" / "reference"

#: Options of a full run and of ``--quick``.
FULL = Options(limit=60.0, budget=10.0, repeats=9, warm_steps=4, measurements=10, every=6)
QUICK = Options(
    limit=20.0, budget=1.5, repeats=3, min_repeats=1, warm_steps=3, measurements=2, every=4
)
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


# --------------------------------------------------------------------------- output


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
        f"killed after {args.timeout:.0f} s (report, fit and {'/'.join(LONG_MODELS)} cases: "
        f"{REPORT_TIMEOUT:.0f} s) and keeps "
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


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``benchmarks/run.py``."""
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
    return parser


def case_options(args: argparse.Namespace) -> Options:
    """The options of the cases (``--quick``'s or a full run's, with the overrides given).

    Also sets ``args.limit`` and ``args.timeout`` to the values the run uses.
    """
    base = QUICK if args.quick else FULL
    overrides = {"device": args.device, "threads": args.threads}
    for name in ("limit", "budget", "repeats"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    options = dataclasses.replace(base, **overrides)
    args.limit = options.limit
    args.timeout = args.timeout or (QUICK_TIMEOUT if args.quick else TIMEOUT)
    return options


def run_cases(
    cases: list[Case], options: Options, args: argparse.Namespace, logs: Path
) -> list[dict]:
    """Run every case in turn (in this process with ``--in-process``), printing progress."""
    results = []
    for index, case in enumerate(cases, 1):
        print(f"[{index}/{len(cases)}] {case.name} ...", flush=True)
        if args.in_process:
            case_start = time.perf_counter()
            result = run_case(case.to_dict(), options)
            result["seconds"] = time.perf_counter() - case_start
        else:
            long = case.kind in ("report", "fit") or case.model in LONG_MODELS
            limit = max(args.timeout, REPORT_TIMEOUT) if long else args.timeout
            result = run_in_process(case, options, limit, logs)
            if args.baseline is not None and case.kind != "report":
                result["baseline"] = run_in_process(case, options, limit, logs, args.baseline)
                print("    today: " + progress_line(result["baseline"]), flush=True)
        results.append(result)
        print("    " + progress_line(result), flush=True)
    return results


def write(text: str, results: list[dict], output: Path, args: argparse.Namespace) -> None:
    """Write the tables and the raw results (and, with ``--reference``, the reference copy)."""
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


def main(argv: list[str] | None = None) -> int:
    """Run the chosen cases, print and write the tables.

    Returns:
        0 (a case that fails or misses its target is a result, not an error of the run).
    """
    command = build_parser()
    args = command.parse_args(argv)
    try:
        cases = select(args.cases, args.quick)
    except ValueError as error:
        command.error(str(error))
    if args.list:
        print("\n".join(case.name for case in cases))
        return 0
    options = case_options(args)
    output = args.output or RESULTS / f"{output_name(args.device)}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    logs = output.parent / f"{output.stem}-logs"
    machine = machine_line(args.device, args.threads)
    print(f"fisher-monitor benchmark: {len(cases)} cases on {machine}", flush=True)
    started = time.perf_counter()
    results = run_cases(cases, options, args, logs)
    text = render(results, args, time.perf_counter() - started)
    print()
    print(text)
    write(text, results, output, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
