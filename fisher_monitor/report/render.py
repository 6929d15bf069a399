"""Turn loaded runs into ``report.html`` (self-contained), ``report.md`` and ``summary.json``."""

from __future__ import annotations

import base64
import datetime
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2
import markupsafe

from fisher_monitor.report import figures
from fisher_monitor.report.load import Run
from fisher_monitor.report.verdict import (
    LAYER_COLUMNS,
    THRESHOLDS,
    layer_table,
    verdicts,
    worst_step,
)

FORMATS = ("html", "md", "json")
SETTING_KEYS = (
    "structures",
    "fisher",
    "mc_samples",
    "damping",
    "damping_mode",
    "schedule",
    "probe_size",
    "fixed probe",
)


@dataclass
class RenderedFigure:
    """A figure as PNG bytes with its file name and caption."""

    name: str
    caption: str
    data: bytes


def _figures(runs: Sequence[Run]) -> list[RenderedFigure]:
    rendered = [
        RenderedFigure(
            "direction_cosine",
            "Cosine between the natural gradient F̃⁻¹g and the EF-preconditioned gradient ẼF⁻¹g, "
            "per layer and for all layers (bold); dotted lines: agreement and disagreement "
            "thresholds.",
            figures.png(figures.direction_cosine(runs)),
        ),
        RenderedFigure(
            "trace_ratio_kl",
            "Left: tr EF / tr F for the whole network (1 means equal scale). Right: KL divergence "
            "between the Laplace approximations with precision F̃ and ẼF.",
            figures.png(figures.trace_ratio_and_kl(runs)),
        ),
        RenderedFigure(
            "relative_error",
            "Relative Frobenius error of the EF, per layer and overall.",
            figures.png(figures.relative_error(runs)),
        ),
        RenderedFigure(
            "projections",
            "gᵀF̃⁻¹g against gᵀẼF⁻¹g, with the per-sample projection (1/N) Σ g_nᵀẼF⁻¹g_n and the "
            "dimension D for reference: the per-sample projection tends to rank EF as λ → 0 "
            "whatever the data.",
            figures.png(figures.projections(runs)),
        ),
    ]
    for index, run in enumerate(runs):
        suffix = f"_{index}" if len(runs) > 1 else ""
        rendered.append(
            RenderedFigure(
                f"heatmap{suffix}",
                f"Direction cosine, layers × steps ({run.name}).",
                figures.png(figures.heatmap(run)),
            )
        )
        distribution = figures.log_ratio_distribution(run)
        if distribution is not None:
            rendered.append(
                RenderedFigure(
                    f"log_ratio{suffix}",
                    f"Distribution of log10(EF_ii / F_ii) per layer at the first, middle and last "
                    f"measured step ({run.name}); 0 means equal diagonals.",
                    figures.png(distribution),
                )
            )
    return rendered


def _clean(value):
    """JSON-safe numbers (NaN and infinities become ``None``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def run_summary(run: Run) -> dict:
    """The numbers behind the verdicts of one run, with stable keys."""
    last = run.steps[-1]
    worst = worst_step(run)
    layers = {}
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
            "measurements": len(run.steps),
            "steps": run.steps,
            "last_step": last,
            "worst_step": worst,
            "verdicts": [v.as_dict() for v in verdicts(run)],
            "layers": layers,
            "final": {key: run.value(key, last) for key in sorted(run.scalars)},
            "notes": run.notes,
        }
    )


def summary(runs: Sequence[Run]) -> dict:
    """The ``summary.json`` document."""
    return {
        "fisher_monitor_report": 1,
        "thresholds": THRESHOLDS,
        "runs": [run_summary(run) for run in runs],
    }


def _format(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    magnitude = abs(value)
    if magnitude != 0 and (magnitude >= 1e4 or magnitude < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4g}"


def _format_int(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{int(value):,}"


def _format_cell(metric: str, value) -> str:
    """A layer-table cell: the dimension as a whole number, metrics as :func:`_format`."""
    return _format_int(value) if metric == "dimension" else _format(value)


def _context(runs: Sequence[Run], title: str) -> dict:
    from fisher_monitor import __version__

    entries = []
    for run in runs:
        last, worst = run.steps[-1], worst_step(run)
        tables = [{"title": f"Last measurement (step {last})", "rows": layer_table(run, last)}]
        if worst != last:
            tables.append(
                {
                    "title": f"Worst measurement (step {worst}, lowest direction cosine)",
                    "rows": layer_table(run, worst),
                }
            )
        entries.append(
            {
                "name": run.name,
                "settings": run.settings,
                "verdicts": verdicts(run),
                "measurements": len(run.steps),
                "first_step": run.steps[0],
                "last_step": last,
                "tables": tables,
                "notes": run.notes,
            }
        )
    return {
        "title": title,
        "version": __version__,
        "generated": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "runs": entries,
        "thresholds": THRESHOLDS,
        "layer_columns": LAYER_COLUMNS,
        "setting_keys": [k for k in SETTING_KEYS if any(k in run.settings for run in runs)],
    }


def _code_spans(text: str) -> markupsafe.Markup:
    """Escape ``text`` and render its `backticked` parts as ``<code>``."""
    escaped = str(markupsafe.escape(text))
    return markupsafe.Markup(re.sub(r"`([^`]*)`", r"<code>\1</code>", escaped))


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("fisher_monitor.report", "templates"),
        autoescape=True,  # layer names come from user code
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.globals["cell"] = _format_cell
    environment.filters["code_spans"] = _code_spans
    return environment


def render_html(runs: Sequence[Run], title: str, rendered: list[RenderedFigure]) -> str:
    """The self-contained HTML report (figures embedded as data URIs)."""
    figures_base64 = [
        {"name": f.name, "caption": f.caption, "data": base64.b64encode(f.data).decode()}
        for f in rendered
    ]
    context = _context(runs, title)
    return _environment().get_template("report.html.j2").render(**context, figures=figures_base64)


def _md_escape(text: str) -> str:
    return re.sub(r"([\\`*_{}\[\]<>|#])", r"\\\1", str(text))


def render_markdown(runs: Sequence[Run], title: str, rendered: list[RenderedFigure]) -> str:
    """``report.md``: the same verdicts and tables, figures as PNG files next to it."""
    context = _context(runs, title)
    lines = [f"# {_md_escape(title)}", ""]
    for run in context["runs"]:
        lines += [f"## {_md_escape(run['name'])}", ""]
        for verdict in run["verdicts"]:
            lines += [f"- **{verdict.topic} ({verdict.level})**: {_md_escape(verdict.text)}"]
        lines += ["", "| setting | value |", "| --- | --- |"]
        lines += [f"| {k} | {_md_escape(v)} |" for k, v in run["settings"].items()]
        lines += [""]
        for table in run["tables"]:
            headings = " | ".join(heading for _, heading in LAYER_COLUMNS)
            lines += [
                f"### {_md_escape(table['title'])}",
                "",
                f"| layer | {headings} |",
                "| --- |" + " ---: |" * len(LAYER_COLUMNS),
            ]
            for row in table["rows"]:
                cells = [_format_cell(metric, row[metric]) for metric, _ in LAYER_COLUMNS]
                lines.append(f"| {_md_escape(row['layer'])} | " + " | ".join(cells) + " |")
            lines.append("")
        if run["notes"]:
            lines += ["Notes:", "", *[f"- {_md_escape(n)}" for n in run["notes"]], ""]
    lines += ["## Figures", ""]
    for figure in rendered:
        lines += [
            f"![{_md_escape(figure.caption)}]({figure.name}.png)",
            "",
            f"*{figure.caption}*",
            "",
        ]
    thresholds = context["thresholds"]
    lines += [
        "## Thresholds",
        "",
        f"Direction disagrees below cosine {thresholds['disagree_cosine']}, agrees from "
        f"{thresholds['agree_cosine']}; matrices differ above relative error "
        f"{thresholds['rel_error_limit']}; scale is off outside trace ratio "
        f"{thresholds['trace_ratio_range']}.",
        "",
    ]
    return "\n".join(lines)


def write_report(
    runs: Sequence[Run], out_dir: Path, formats: Sequence[str] = FORMATS, title: str | None = None
) -> dict[str, Path]:
    """Write the requested formats into ``out_dir``.

    Args:
        runs: Loaded runs.
        out_dir: Output directory (created).
        formats: Any of ``"html"``, ``"md"``, ``"json"``.
        title: Report title (default: "fisher-monitor report: <run names>").

    Returns:
        Paths written, per format.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    title = title or "fisher-monitor report: " + ", ".join(run.name for run in runs)
    written: dict[str, Path] = {}
    rendered = _figures(runs) if {"html", "md"} & set(formats) else []
    if "html" in formats:
        path = out_dir / "report.html"
        path.write_text(render_html(runs, title, rendered), encoding="utf-8")
        written["html"] = path
    if "md" in formats:
        for figure in rendered:
            (out_dir / f"{figure.name}.png").write_bytes(figure.data)
        path = out_dir / "report.md"
        path.write_text(render_markdown(runs, title, rendered), encoding="utf-8")
        written["md"] = path
    if "json" in formats:
        path = out_dir / "summary.json"
        path.write_text(json.dumps(summary(runs), indent=2, allow_nan=False), encoding="utf-8")
        written["json"] = path
    return written
