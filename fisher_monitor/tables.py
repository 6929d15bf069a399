"""Per-layer tables of one measurement, as text: the report's and ``Measurement.table()``.

Standard library only. A table has one row per layer (and ``all``) and one column per
metric of :data:`LAYER_COLUMNS`; where the standard error of an estimated metric was
logged (``{structure}/{metric}_se…/{layer}``) the cell reads ``value ± se``. Numbers are
formatted for reading: dimensions as whole numbers with thousands separators, cosines
with three decimals, other values with three significant digits (scientific notation
outside [10⁻³, 10⁴)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fisher_monitor import keys


@dataclass(frozen=True)
class Column:
    """One column of a per-layer table.

    Attributes:
        metric: Metric name (see :mod:`fisher_monitor.keys`).
        heading: Column heading (what the number is).
    """

    metric: str
    heading: str


#: Columns of the per-layer tables, after the layer name.
LAYER_COLUMNS: tuple[Column, ...] = (
    Column("dimension", "D (parameters)"),
    Column("direction_cosine", "cos(F̃⁻¹g, ẼF⁻¹g)"),
    Column("trace_ratio", "tr EF / tr F"),
    Column("rel_error", "‖EF − F‖ / ‖F‖"),
    Column("kl", "KL (nats)"),
    Column("nat_projection", "gᵀF̃⁻¹g"),
    Column("ef_projection", "gᵀẼF⁻¹g"),
)
#: Placeholder of a value that was not measured (or is not finite).
MISSING = "–"


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_number(value: float | None, metric: str | None = None) -> str:
    """A number for reading: see the module docstring; ``–`` when missing or not finite."""
    if not _finite(value):
        return MISSING
    if metric == "dimension":
        return f"{round(value):,}"
    if metric in keys.COSINE_METRICS:
        return f"{value:.3f}"
    magnitude = abs(value)
    if magnitude != 0 and (magnitude >= 1e4 or magnitude < 1e-3):
        return f"{value:.2e}"
    return f"{value:.3g}"


def format_value(
    value: float | None, stderr: float | None = None, metric: str | None = None
) -> str:
    """``format_number(value)``, followed by `` ± se`` when a finite standard error is given."""
    text = format_number(value, metric)
    if text != MISSING and _finite(stderr):
        text += f" ± {stderr:.2g}"
    return text


def layer_rows(
    values: Mapping[str, float],
    layers: Sequence[str],
    structure: str,
    suffix: str = "",
    columns: Sequence[Column] = LAYER_COLUMNS,
    dimensions: Mapping[str, float] | None = None,
) -> list[dict[str, float | str | None]]:
    """The values of each layer (and ``all``) for the table's columns.

    Args:
        values: Metric key (``"block/kl/fc1"``, without a logging prefix) to value, e.g.
            ``Measurement.scalars`` or a run's values at one step.
        layers: Layer names in the order to show (``all`` is added last).
        structure: ``"diag"``, ``"block"`` or ``"kron"``.
        suffix: Damping suffix of the damped metrics (``""`` or ``"@0.001"``).
        columns: The metrics to read.
        dimensions: Per layer (and ``all``), the dimension D where it is not in ``values``.

    Returns:
        One dict per row: ``"layer"``, each column's metric (``None`` when missing) and,
        where logged, ``"{metric}_se"`` with its standard error.
    """
    rows = []
    for layer in [*layers, keys.ALL]:
        row: dict[str, float | str | None] = {"layer": layer}
        for column in columns:
            metric = column.metric
            damped = suffix if metric in keys.DAMPED_METRICS else ""
            value = values.get(keys.metric_key(structure, metric, layer, damped))
            if value is None and metric == "dimension" and dimensions is not None:
                value = dimensions.get(layer)
            row[metric] = value
            stderr = values.get(keys.stderr_key(structure, metric, layer, damped))
            if stderr is not None:
                row[f"{metric}_se"] = stderr
        rows.append(row)
    return rows


def row_cells(row: Mapping[str, object], columns: Sequence[Column] = LAYER_COLUMNS) -> list[str]:
    """A row's formatted cells, the layer name first."""
    cells = [str(row["layer"])]
    for column in columns:
        value = row.get(column.metric)
        cells.append(format_value(value, row.get(f"{column.metric}_se"), column.metric))
    return cells


def text_table(headings: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain monospace table: left-aligned first column, right-aligned numbers."""
    widths = [len(h) for h in headings]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        parts = [first.ljust(widths[0])]
        parts += [cell.rjust(width) for cell, width in zip(rest, widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headings), rule, *(line(row) for row in rows)])


def layer_table(
    values: Mapping[str, float],
    layers: Sequence[str],
    structure: str,
    suffix: str = "",
    dimensions: Mapping[str, float] | None = None,
) -> str:
    """The per-layer table of one measurement as text (``Measurement.table()``).

    Args:
        values: Metric key to value (see :func:`layer_rows`).
        layers: Layer names in order (``all`` is added last).
        structure: The structure to show.
        suffix: Damping suffix of the damped metrics.
        dimensions: Dimensions where ``values`` has none.

    Returns:
        The table, one line per layer, headed by the column names.
    """
    rows = layer_rows(values, layers, structure, suffix, LAYER_COLUMNS, dimensions)
    headings = ["layer", *(column.heading for column in LAYER_COLUMNS)]
    return text_table(headings, [row_cells(row) for row in rows])


__all__ = [
    "LAYER_COLUMNS",
    "MISSING",
    "Column",
    "format_number",
    "format_value",
    "layer_rows",
    "layer_table",
    "row_cells",
    "text_table",
]
