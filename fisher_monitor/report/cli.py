"""The ``fisher-monitor`` command line: ``report`` and ``summary``.

Exit codes: 0 on success, 2 with a one-line message (no traceback) on bad input.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from fisher_monitor.report.load import ReportError, Run, load_runs
from fisher_monitor.report.render import FORMATS, write_report
from fisher_monitor.report.verdict import headline, layer_table, worst_step

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    from fisher_monitor import __version__

    parser = argparse.ArgumentParser(
        prog="fisher-monitor",
        description="Turn FisherMonitor's TensorBoard logs into a readable verdict: where and "
        "when was the empirical Fisher a poor stand-in for the Fisher?",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="write report.html, report.md (+ PNG figures) and summary.json",
        description="Write a report of one or more runs (compared side by side).",
    )
    report.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="TensorBoard log directory: a run (e.g. lightning_logs/version_0) or a parent "
        "holding several runs",
    )
    report.add_argument(
        "-o",
        "--out-dir",
        type=Path,
        default=Path("fisher-report"),
        help="output directory (default: ./fisher-report)",
    )
    report.add_argument(
        "--format",
        default=",".join(FORMATS),
        help=f"comma-separated subset of {','.join(FORMATS)} (default: all)",
    )
    report.add_argument("--title", default=None, help="report title")
    summary = commands.add_parser(
        "summary",
        help="print a compact table (layers × key metrics) in the terminal",
        description="Print layers × key metrics at the last and the worst step.",
    )
    summary.add_argument("runs", nargs="+", metavar="RUN", help="TensorBoard log directory")
    return parser


def _load(paths: Sequence[str], console) -> list[Run]:
    from rich.progress import Progress, SpinnerColumn, TextColumn

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), console=console, transient=True
    ) as progress:
        task = progress.add_task("finding runs", total=None)
        return load_runs(
            paths, progress=lambda name: progress.update(task, description=f"loading {name}")
        )


def _parse_formats(value: str) -> list[str]:
    formats = [f.strip().lower() for f in value.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ReportError(
            f"unknown format {unknown[0] if unknown else value!r}; choose from {','.join(FORMATS)}"
        )
    return formats


def _number(value: float) -> str:
    if not math.isfinite(value):
        return "–"
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.2e}"
    return f"{value:.3g}"


def _print_summary(runs: Sequence[Run], console) -> None:
    from rich.table import Table

    for run in runs:
        last, worst = run.steps[-1], worst_step(run)
        table = Table(title=f"{run.name} ({run.primary_structure}, {len(run.steps)} measurements)")
        table.add_column("layer", style="bold")
        table.add_column("D", justify="right")
        for label in ("cos last", "cos worst", "trEF/trF last", "rel.err last", "KL last"):
            table.add_column(label, justify="right")
        last_rows = {r["layer"]: r for r in layer_table(run, last)}
        worst_rows = {r["layer"]: r for r in layer_table(run, worst)}
        for layer, row in last_rows.items():
            table.add_row(
                layer,
                _number(row["dimension"]),
                _number(row["direction_cosine"]),
                _number(worst_rows[layer]["direction_cosine"]),
                _number(row["trace_ratio"]),
                _number(row["rel_error"]),
                _number(row["kl"]),
            )
        console.print(table, markup=False)
        verdict = headline(run)
        if verdict is not None:
            console.print(f"last step {last}, worst step {worst}. {verdict.text}", markup=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    from rich.console import Console

    console = Console(stderr=True)
    args = _parser().parse_args(argv)
    try:
        if args.command == "report":
            formats = _parse_formats(args.format)
            runs = _load(args.runs, console)
            written = write_report(runs, args.out_dir, formats, args.title)
            out = Console()
            for kind, path in written.items():
                out.print(f"{kind}: {path}", markup=False, highlight=False)
        else:
            runs = _load(args.runs, console)
            _print_summary(runs, Console())
    except ReportError as error:
        print(f"fisher-monitor: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def entry_point() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry_point()
