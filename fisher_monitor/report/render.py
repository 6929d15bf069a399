"""Turn loaded runs into ``report.html`` (self-contained), ``report.md`` and ``summary.json``.

Every user-controlled string (run names and paths, layer names, settings, notes) is
escaped for its output: by Jinja's autoescaping in HTML, by
:func:`~fisher_monitor.report.text.markdown_text` in Markdown.

With many runs (more than :data:`~fisher_monitor.report.selection.MANY_RUNS`) the HTML
and Markdown list every run in one table and show figures and details for the runs that
matter (:mod:`fisher_monitor.report.selection`), and say so. Every file is written to a
temporary name and renamed (:func:`fisher_monitor.runinfo.atomic_write`): a full disk
leaves the previous report, never a truncated one.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2
import markupsafe

from fisher_monitor import keys, runinfo, tables
from fisher_monitor.report import figures
from fisher_monitor.report.progress import Progress
from fisher_monitor.report.runs import ReportError, Run
from fisher_monitor.report.selection import MANY_RUNS, Selection, select_runs
from fisher_monitor.report.text import markdown_code, markdown_text
from fisher_monitor.report.thresholds import THRESHOLDS
from fisher_monitor.report.verdict import Code, Verdict, advice, headline, verdicts, worst_step

FORMATS = ("html", "md", "json")
#: Metrics explained in the reports' "how to read" table, in that order.
EXPLAINED = (
    "direction_cosine",
    "trace_ratio",
    "rel_error",
    "kl",
    "nat_projection",
    "ef_projection",
    "ef_projection_per_sample",
    *keys.UPDATE_METRICS,
    *keys.OPTIMIZER_METRICS,
)
LEVEL_LABELS = {
    "bad": "bad",
    "mixed": "mixed",
    "good": "good",
    "info": "note",
    "insufficient": "insufficient evidence",
}


@dataclass
class RenderedFigure:
    """A figure as PNG bytes with its file name and caption."""

    name: str
    caption: str
    data: bytes


def _figure_plan(runs: Sequence[Run]) -> list[tuple[str, str, Callable]]:
    """``(name, caption, draw)`` of every figure; ``draw()`` returns a Figure or ``None``."""
    plan: list[tuple[str, str, Callable]] = [
        (
            "direction_cosine",
            "Cosine between the natural gradient F̃⁻¹g and the EF-preconditioned gradient "
            "ẼF⁻¹g per layer, and for the whole network (black); dotted: the agreement (0.9) "
            "and disagreement (0.5) thresholds. With many layers, the layers with the lowest "
            "and highest median cosine are coloured and named, the others grey.",
            lambda: figures.direction_cosine(runs),
        ),
        (
            "trace_ratio_kl",
            "Left: tr EF / tr F of the whole network (1 means equal scale). Right: KL "
            "divergence between the Laplace approximations with precision F̃ and ẼF.",
            lambda: figures.trace_ratio_and_kl(runs),
        ),
        (
            "relative_error",
            "Relative Frobenius error of the EF per layer, and for the whole network (black).",
            lambda: figures.relative_error(runs),
        ),
        (
            "projections",
            "Projections of the gradient for the whole network ('all'): each is a sum over "
            "the layers. gᵀẼF⁻¹g is at most 1 per layer, so at most the number of layers for "
            "'all'; the per-sample projection (1/N) Σ gₙᵀẼF⁻¹gₙ tends to rank EF (at most D) "
            "as λ → 0, whatever the data.",
            lambda: figures.projections(runs),
        ),
    ]
    for index, run in enumerate(runs):
        plan += _run_figure_plan(run, f"_{index}" if len(runs) > 1 else "")
    return plan


def _run_figure_plan(run: Run, suffix: str) -> list[tuple[str, str, Callable]]:
    """The figures of one run (as :func:`_figure_plan`); ``suffix`` tells runs apart."""
    plan: list[tuple[str, str, Callable]] = [
        (
            f"heatmap{suffix}",
            f"Direction cosine, layers × steps ({run.name}): red below 0.5 (the EF step "
            "disagrees), yellow up to 0.9, green from 0.9 (agrees); grey: not measured.",
            lambda: figures.heatmap(run),
        )
    ]
    if run.histograms:
        plan.append(
            (
                f"log_ratio{suffix}",
                "Distribution of log10(EF_ii / F_ii) per layer at the first, middle and "
                f"last measured step ({run.name}); 0 means equal diagonals.",
                lambda: figures.log_ratio_distribution(run),
            )
        )
    if run.has_update_audit:
        preconditioner = any(p.structure == keys.OPTIMIZER for p in run.parsed.values())
        caption = (
            "The optimizer's applied update against the natural-gradient step, the "
            "EF-preconditioned step and −g"
            + (
                " (left), and its diagonal preconditioner against √diag EF and √diag F (right)"
                if preconditioner
                else ""
            )
            + f", whole network ({run.name})."
        )
        plan.append((f"optimizer{suffix}", caption, lambda: figures.optimizer_audit(run)))
    return plan


def render_figures(runs: Sequence[Run], progress: Progress | None = None) -> list[RenderedFigure]:
    """Draw every figure as PNG."""
    progress = progress or Progress()
    plan = _figure_plan(runs)
    progress.stage("drawing figures", len(plan), "figures")
    rendered = []
    for name, caption, draw in plan:
        figure = draw()
        if figure is not None:
            rendered.append(RenderedFigure(name, caption, figures.png(figure)))
        progress.advance()
    return rendered


def _clean(value):
    """JSON-safe numbers (NaN and infinities become ``None``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def layer_table(run: Run, step: int) -> list[dict[str, float | str | None]]:
    """Per-layer values of the table's metrics at ``step`` (plus ``all``), with ``_se``."""
    return tables.layer_rows(
        run.values_at(step),
        run.layers,
        run.primary_structure,
        run.dampings[0],
        dimensions=run.dimensions,
    )


def run_summary(run: Run, found: list[Verdict] | None = None) -> dict:
    """The numbers behind the verdicts of one run, with stable keys."""
    found = verdicts(run) if found is None else found
    last = run.steps[-1]
    worst = worst_step(run)
    layers: dict = {}
    for when, step in (("last", last), ("worst", worst)):
        for row in layer_table(run, step):
            entry = layers.setdefault(row["layer"], {})
            entry[when] = {k: v for k, v in row.items() if k != "layer"}
    return _clean(
        {
            "name": run.name,
            "path": str(run.path),
            "prefix": run.prefix,
            "structure": run.primary_structure,
            "structures": run.structures,
            "settings": run.settings,
            "fit": run.fit,
            "measurements": len(run.steps),
            "steps": run.steps,
            "last_step": last,
            "worst_step": worst,
            "headline": headline(run).as_dict(),
            "verdicts": [v.as_dict() for v in found],
            "advice": advice(run, found),
            "layers": layers,
            "dimensions": run.dimensions,
            "final": run.values_at(last),
            "notes": run.notes,
            "read_notes": run.read_notes,
        }
    )


def summary(runs: Sequence[Run], selection: Selection | None = None) -> dict:
    """The ``summary.json`` document: every run in full (``shown_in_full``: in the report)."""
    selection = selection or select_runs(runs)
    return {
        "fisher_monitor_report": 2,
        "thresholds": THRESHOLDS,
        "runs": [run_summary(run, selection.verdicts_of(run)) for run in runs],
        "shown_in_full": [run.name for run in selection.shown],
    }


def setting_text(value) -> str:
    """A setting's value as text (lists joined by commas)."""
    if isinstance(value, (list, tuple)):
        return ", ".join(setting_text(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _fit_rows(run: Run) -> dict[str, str]:
    rows = {}
    fit = run.fit
    if isinstance(fit.get("overhead"), (int, float)):
        rows["monitor's share of the fit time"] = f"{100 * fit['overhead']:.1f}%"
    if isinstance(fit.get("monitor_seconds"), (int, float)):
        rows["monitor time"] = f"{fit['monitor_seconds']:.1f} s"
    if isinstance(fit.get("fit_seconds"), (int, float)):
        rows["fit time"] = f"{fit['fit_seconds']:.1f} s"
    return rows


def _verdict_html(verdict: Verdict) -> markupsafe.Markup:
    text = markupsafe.Markup("").join(
        markupsafe.Markup("<code>{}</code>").format(part)
        if isinstance(part, Code)
        else markupsafe.escape(part)
        for part in verdict.parts
    )
    if not verdict.links:
        return text
    links = markupsafe.Markup(" and ").join(
        markupsafe.Markup('<code class="doc">{}</code>').format(link) for link in verdict.links
    )
    return text + markupsafe.Markup(' <span class="links">(See {}.)</span>').format(links)


def _verdict_markdown(verdict: Verdict) -> str:
    text = "".join(
        markdown_code(part) if isinstance(part, Code) else markdown_text(part)
        for part in verdict.parts
    )
    links = " and ".join(markdown_code(link) for link in verdict.links)
    return f"{text} (See {links}.)" if links else text


def _context(runs: Sequence[Run], title: str, selection: Selection | None = None) -> dict:
    """What the templates show: the runs shown in full, the overview of all, the legend."""
    from fisher_monitor.version import __version__

    selection = selection or select_runs(runs)
    shown = selection.shown
    setting_keys = list(dict.fromkeys(key for run in shown for key in run.settings))
    entries = [_run_entry(run, selection) for run in shown]
    fit_keys = list(dict.fromkeys(key for entry in entries for key in entry["fit"]))
    return {
        "title": title,
        "version": __version__,
        "generated": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "runs": entries,
        "run_count": len(runs),
        "many_runs_note": selection.note,
        "overview_headings": selection.headings,
        "overview_rows": selection.rows,
        "thresholds": THRESHOLDS,
        "headings": ["layer", *(column.heading for column in tables.LAYER_COLUMNS)],
        "setting_keys": setting_keys,
        "fit_keys": fit_keys,
        "descriptions": [(metric, keys.DESCRIPTIONS[metric]) for metric in EXPLAINED],
        "level_labels": LEVEL_LABELS,
    }


def _run_entry(run: Run, selection: Selection) -> dict:
    """One run shown in full: verdicts, advice, settings, per-layer tables, notes."""
    found = selection.verdicts_of(run)
    last, worst = run.steps[-1], worst_step(run)
    tables_ = [{"title": f"Values at the last measurement (step {last})", "step": last}]
    if worst != last:
        tables_.append(
            {
                "title": f"Values at step {worst}, the whole network's worst measurement "
                "(lowest direction cosine of 'all')",
                "step": worst,
            }
        )
    for table in tables_:
        table["rows"] = [tables.row_cells(row) for row in layer_table(run, table["step"])]
    return {
        "name": run.name,
        "settings": {key: setting_text(run.settings[key]) for key in run.settings},
        "fit": _fit_rows(run),
        "headline": headline(run),
        "verdicts": found,
        "advice": advice(run, found),
        "measurements": len(run.steps),
        "first_step": run.steps[0],
        "last_step": last,
        "tables": tables_,
        "notes": run.notes,
        "read_notes": run.read_notes,
        "layers": len(run.layers),
    }


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("fisher_monitor.report", "templates"),
        autoescape=True,  # names come from user code
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["verdict_html"] = _verdict_html
    return environment


def render_html(
    runs: Sequence[Run],
    title: str,
    rendered: list[RenderedFigure],
    selection: Selection | None = None,
) -> str:
    """The self-contained HTML report (figures embedded as data URIs)."""
    figures_base64 = [
        {"name": f.name, "caption": f.caption, "data": base64.b64encode(f.data).decode()}
        for f in rendered
    ]
    context = _context(runs, title, selection)
    return _environment().get_template("report.html.j2").render(**context, figures=figures_base64)


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _markdown_verdicts(run: dict) -> list[str]:
    """The headline, then one bullet per verdict."""
    headline_level = LEVEL_LABELS[run["headline"].level]
    lines = [f"**In short ({headline_level})**: {_verdict_markdown(run['headline'])}", ""]
    for verdict in run["verdicts"]:
        label = LEVEL_LABELS[verdict.level]
        lines.append(f"- **{verdict.topic} ({label})**: {_verdict_markdown(verdict)}")
    return lines


def render_markdown(
    runs: Sequence[Run],
    title: str,
    rendered: list[RenderedFigure],
    selection: Selection | None = None,
) -> str:
    """``report.md``: the same verdicts and tables, figures as PNG files next to it."""
    context = _context(runs, title, selection)
    lines = [f"# {markdown_text(title)}", ""]
    lines += _markdown_overview(context)
    for run in context["runs"]:
        lines += _markdown_run(run, context["headings"])
    lines += ["## Figures", ""]
    for figure in rendered:
        caption = markdown_text(figure.caption)
        lines += [f"![{caption}]({figure.name}.png)", "", f"*{caption}*", ""]
    return "\n".join(lines + _markdown_reading(context))


def _markdown_run(run: dict, headings: Sequence[str]) -> list[str]:
    """One run's section: verdicts, what to change, settings, per-layer tables, notes."""
    lines = [f"## {markdown_text(run['name'])}", "", *_markdown_verdicts(run)]
    if run["advice"]:
        lines += ["", "What to change:", ""]
        lines += [f"- {markdown_text(tip, True)}" for tip in run["advice"]]
    lines += ["", "| setting | value |", "| --- | --- |"]
    for key, value in [*run["settings"].items(), *run["fit"].items()]:
        lines.append(_md_row([markdown_text(key), markdown_text(value)]))
    steps = f"{run['measurements']} (steps {run['first_step']}–{run['last_step']})"
    lines += [_md_row(["measurements", steps]), ""]
    for table in run["tables"]:
        lines += [
            f"### {markdown_text(table['title'])}",
            "",
            _md_row([markdown_text(h) for h in headings]),
            "| --- |" + " ---: |" * (len(headings) - 1),
        ]
        lines += [_md_row([markdown_text(cell) for cell in row]) for row in table["rows"]]
        lines.append("")
    if run["notes"]:
        lines += ["Notes:", "", *[f"- {markdown_text(n, True)}" for n in run["notes"]], ""]
    if run["read_notes"]:
        lines += ["Reading the logs:", ""]
        lines += [f"- {markdown_text(n, True)}" for n in run["read_notes"]] + [""]
    return lines


def _markdown_reading(context: dict) -> list[str]:
    """The "how to read this" section: every metric, the thresholds, the notation."""
    thresholds = context["thresholds"]
    return [
        "## How to read this",
        "",
        "| metric | meaning |",
        "| --- | --- |",
        *[_md_row([f"`{m}`", markdown_text(d)]) for m, d in context["descriptions"]],
        "",
        f"Thresholds: the EF direction disagrees below cosine {thresholds['disagree_cosine']} "
        f"and agrees from {thresholds['agree_cosine']}; the matrices differ above relative "
        f"error {thresholds['rel_error_limit']}; the scale is off outside trace ratio "
        f"{thresholds['trace_ratio_range']}; fewer than {thresholds['min_measurements']} "
        "measurements, or none after a training step, are insufficient evidence.",
        "",
        "Notation: F̃ = F + λI and ẼF = EF + λI (damped with the logged λ). Terms: "
        "`docs/glossary.md`; what to do about each verdict: `docs/guide/acting.md`.",
        "",
    ]


def _markdown_overview(context: dict) -> list[str]:
    """The statement and the table of every run, for a report of many runs."""
    if not context["many_runs_note"]:
        return []
    headings = context["overview_headings"]
    lines = [markdown_text(context["many_runs_note"]), "", "## Runs", ""]
    lines += [_md_row([markdown_text(h) for h in headings]), "| --- |" * len(headings)]
    lines += [_md_row([markdown_text(cell) for cell in row]) for row in context["overview_rows"]]
    return [*lines, ""]


def default_title(runs: Sequence[Run]) -> str:
    """``"fisher-monitor report: a, b"``; with more than three runs, their number."""
    if len(runs) > 3:
        return f"fisher-monitor report: {len(runs)} runs"
    return "fisher-monitor report: " + ", ".join(run.name for run in runs)


def prepare_output_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and check that files can be written in it.

    Raises:
        ReportError: When it cannot be created or written, with the reason.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=out_dir, prefix=".fisher-monitor-", suffix=".tmp")
        os.close(handle)
        os.unlink(probe)
    except FileExistsError:
        raise ReportError(
            f"cannot create output directory {out_dir}: a file is in the way"
        ) from None
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ReportError(f"cannot write to output directory {out_dir}: {reason}") from None


def write_report(
    runs: Sequence[Run],
    out_dir: Path,
    formats: Sequence[str] = FORMATS,
    title: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Path]:
    """Write the requested formats into ``out_dir``.

    Args:
        runs: Loaded runs.
        out_dir: Output directory (created).
        formats: Any of ``"html"``, ``"md"``, ``"json"``.
        title: Report title (default: "fisher-monitor report: <run names>").
        progress: Progress display (stages: drawing figures, writing).

    Returns:
        Paths written, per format.

    Raises:
        ReportError: When the output directory cannot be created or written.
    """
    progress = progress or Progress()
    out_dir = Path(out_dir)
    prepare_output_dir(out_dir)
    title = title or default_title(runs)
    if len(runs) > MANY_RUNS:  # a stage worth showing: every run is judged for the table
        progress.stage(f"judging {len(runs)} runs")
    selection = select_runs(runs)
    drawn = selection.shown
    rendered = render_figures(drawn, progress) if {"html", "md"} & set(formats) else []
    progress.stage("writing " + ", ".join(formats), len(formats), "files")
    written: dict[str, Path] = {}
    try:
        if "html" in formats:
            path = out_dir / "report.html"
            _write_text(path, render_html(runs, title, rendered, selection))
            written["html"] = path
            progress.advance()
        if "md" in formats:
            for figure in rendered:
                runinfo.atomic_write(out_dir / f"{figure.name}.png", figure.data)
            path = out_dir / "report.md"
            _write_text(path, render_markdown(runs, title, rendered, selection))
            written["md"] = path
            progress.advance()
        if "json" in formats:
            path = out_dir / "summary.json"
            document = summary(runs, selection)
            _write_text(path, json.dumps(document, indent=2, allow_nan=False))
            written["json"] = path
            progress.advance()
    except OSError as error:
        raise ReportError(
            f"cannot write the report into {out_dir}: {error.strerror or error}"
        ) from None
    return written


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8 through a temporary file (never a truncated file)."""
    runinfo.atomic_write(path, text.encode("utf-8", "backslashreplace"))


__all__ = [
    "FORMATS",
    "RenderedFigure",
    "default_title",
    "layer_table",
    "prepare_output_dir",
    "render_figures",
    "render_html",
    "render_markdown",
    "run_summary",
    "setting_text",
    "summary",
    "write_report",
]
