"""The ``fisher-monitor`` command line: ``report`` and ``summary``.

Exit codes: 0 on success, 2 with a one-line message (no traceback) on bad input,
including an output directory that cannot be created or written (checked before any
log is read). Progress goes to standard error: a ``rich`` bar on a terminal, one line
per stage otherwise (``--quiet`` silences it). Only ``argparse`` is imported before the
arguments are parsed, so ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_BAD_INPUT = 2
FORMATS = ("html", "md", "json")  # the same as render.FORMATS, without importing it
USES = ("adam", "sgd", "kfac", "laplace")  # the same as report.headline.USES


def _parser() -> argparse.ArgumentParser:
    from fisher_monitor.version import __version__

    parser = argparse.ArgumentParser(
        prog="fisher-monitor",
        description="Turn FisherMonitor's logs (TensorBoard, CSVLogger or an MLflow file store) "
        "into a readable verdict: where and when was the empirical Fisher a poor stand-in for "
        "the Fisher, and what does it mean for your training?",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="write report.html, report.md (+ PNG figures) and summary.json",
        description="Write a report of one or more runs (compared side by side).",
    )
    summary = commands.add_parser(
        "summary",
        help="print every verdict and a per-layer table in the terminal",
        description="Print every verdict and a per-layer table of each run.",
    )
    for command in (report, summary):
        _add_common_arguments(command)
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
    return parser


def _add_common_arguments(command: argparse.ArgumentParser) -> None:
    """The arguments ``report`` and ``summary`` share: the runs and how to read them."""
    command.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="log directory of TensorBoard, Lightning's CSVLogger or an MLflow file store: "
        "a run (e.g. lightning_logs/version_0, mlruns/0/<run id>) or a parent holding "
        "several runs (one that cannot be read is reported and skipped)",
    )
    command.add_argument(
        "--strict",
        action="store_true",
        help="refuse event files that end in a damaged or partial record (default: read "
        "every valid record and say how many bytes were skipped)",
    )
    command.add_argument(
        "-q", "--quiet", action="store_true", help="no progress output (errors still shown)"
    )
    command.add_argument(
        "--use",
        choices=USES,
        default=None,
        help="how you rely on curvature, for the headline's advice: adam (an optimizer "
        "with a second moment), sgd (none), kfac (a K-FAC/Shampoo-style preconditioner), "
        "laplace (a Laplace approximation, TIC or other uncertainty); default: from the "
        "optimizer the callback recorded",
    )


def _parse_formats(value: str) -> list[str]:
    from fisher_monitor.report.load import ReportError

    formats = [f.strip().lower() for f in value.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ReportError(
            f"unknown format {unknown[0] if unknown else value!r}; choose from {','.join(FORMATS)}"
        )
    return formats


def _lowest(run, layer: str) -> tuple[float, int | None]:
    import numpy as np

    steps, values = run.series(run.key("direction_cosine", layer))
    finite = np.isfinite(values)
    if not finite.any():
        return float("nan"), None
    index = int(np.argmin(np.where(finite, values, np.inf)))
    return float(values[index]), int(steps[index])


def summary_table(run) -> tuple[str, list[str], list[list[str]]]:
    """Caption, headings and cells of the ``summary`` table of one run.

    The standard per-layer table (:mod:`fisher_monitor.tables`) at the last measurement,
    and two more direction-cosine columns: at the whole network's worst step, and each
    layer's own lowest value over the run (with its step).
    """
    from fisher_monitor import tables
    from fisher_monitor.report.render import layer_table
    from fisher_monitor.report.verdict import worst_step

    last, worst = run.steps[-1], worst_step(run)
    rows = layer_table(run, last)
    worst_rows = {row["layer"]: row for row in layer_table(run, worst)}
    headings = ["layer", *(column.heading for column in tables.LAYER_COLUMNS)]
    headings += [
        f"cos at step {worst}, the worst step of the whole network",
        "lowest cos of this layer over the run (step)",
    ]
    cells = []
    for row in rows:
        value, step = _lowest(run, str(row["layer"]))
        lowest = tables.format_number(value, "direction_cosine")
        worst_row = worst_rows[row["layer"]]
        cells.append(
            [
                *tables.row_cells(row),
                tables.format_value(
                    worst_row.get("direction_cosine"),
                    worst_row.get("direction_cosine_se"),
                    "direction_cosine",
                ),
                lowest if step is None else f"{lowest} ({step})",
            ]
        )
    caption = (
        f"{run.name}: {run.primary_structure}, {len(run.steps)} measurements "
        f"(steps {run.steps[0]}–{last}); values at the last measurement (step {last}) except "
        "the last two columns"
    )
    return caption, headings, cells


def _print_summary(runs: Sequence, out) -> None:
    from rich.table import Table
    from rich.text import Text

    from fisher_monitor import tables
    from fisher_monitor.report.render import LEVEL_LABELS
    from fisher_monitor.report.text import terminal_safe
    from fisher_monitor.report.verdict import advice, headline, verdicts

    styles = {"bad": "bold red", "mixed": "bold yellow", "good": "bold green", "info": "bold"}
    for run in runs:
        caption, headings, cells = summary_table(run)
        safe_cells = [[terminal_safe(cell) for cell in row] for row in cells]
        if out.is_terminal:
            table = Table(title=Text(terminal_safe(caption)), title_justify="left")
            for index, heading in enumerate(headings):
                table.add_column(Text(heading), justify="left" if index == 0 else "right")
            for row in safe_cells:
                table.add_row(*(Text(cell) for cell in row))
            out.print(table)
        else:
            out.print(Text(terminal_safe(caption)), soft_wrap=True)
            out.print(Text(tables.text_table(headings, safe_cells)), soft_wrap=True)
        found = verdicts(run)
        for verdict in [headline(run), *found]:
            topic = "in short" if verdict.topic == "headline" else verdict.topic
            line = Text(f"[{LEVEL_LABELS[verdict.level]}] {topic}: ")
            line.stylize(styles.get(verdict.level, "bold"))
            line.append(terminal_safe(verdict.text))
            out.print(line, soft_wrap=not out.is_terminal)
        for tip in advice(run, found):
            out.print(Text(f"What to change: {terminal_safe(tip)}"), soft_wrap=not out.is_terminal)
        out.print()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    from rich.console import Console
    from rich.text import Text

    from fisher_monitor.report.load import ReportError, load_runs
    from fisher_monitor.report.progress import Progress, for_console
    from fisher_monitor.report.text import terminal_safe

    errors = Console(stderr=True)
    try:
        if args.command == "report":
            from fisher_monitor.report.render import prepare_output_dir, write_report

            formats = _parse_formats(args.format)
            prepare_output_dir(args.out_dir)
        with Progress() if args.quiet else for_console(errors) as progress:
            runs = load_runs(args.runs, strict=args.strict, progress=progress)
            for run in runs if args.use else []:  # the verdicts read it from the settings
                run.settings["use"] = args.use
            if args.command == "report":
                written = write_report(runs, args.out_dir, formats, args.title, progress)
        out = Console(highlight=False)
        if args.command == "report":
            for kind, path in written.items():
                out.print(Text(f"{kind}: {terminal_safe(path)}"))
        else:
            _print_summary(runs, out)
    except ReportError as error:
        print(f"fisher-monitor: error: {terminal_safe(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def entry_point() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry_point()
