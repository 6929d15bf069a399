"""The result of one measurement: metric values, diagonals, notes and coverage.

In a notebook a ``Measurement`` shows itself as an HTML table (``_repr_html_``), and
``to_dataframe()`` gives its numbers to pandas (an optional dependency:
``pip install pandas`` or the ``fisher-monitor[pandas]`` extra).
"""

from __future__ import annotations

import difflib
import html
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from fisher_monitor import keys, tables
from fisher_monitor.layers import LayerInfo


@dataclass
class Measurement:
    """The result of one measurement.

    Attributes:
        scalars: Metric values under ``"{structure}/{metric}/{layer}"`` (docs/theory.md#keys;
            estimated values with their standard error under ``"{structure}/{metric}_se/…"``),
            including ``"{structure}/{metric}/all"``, plus ``"probe/loss"``,
            ``"probe/batch_size"``, ``"probe/grad_norm"`` and ``"probe/seconds"``.
        layers: The measured layers in forward (``named_modules``) order.
        diagonals: Per layer name, ``(diag F, diag EF)`` as float64 CPU tensors in
            ``named_parameters`` order.
        settings: The settings used (plain data).
        notes: Things the user should know about this measurement (e.g. a BatchNorm
            layer measured in eval mode, a layer without Kronecker factors).
        coverage: Per layer: ``{"layer", "type", "parameters", "dimension", "backend",
            "measured", "reason", "estimator"}`` — which parameters were measured, by which
            backend (``"backpack"``, ``"autograd"`` or ``"functorch"``; with ``"factors"``, how
            its columns were formed), why a layer was not, and per
            structure whether the Fisher side was exact or estimated
            (``docs/theory.md#estimators``).
        blocks: With ``keep_blocks=True``: per layer name, the dense ``(F_b, EF_b, g_b)``
            (``D_b × D_b``, ``D_b × D_b``, ``D_b``) as float64 CPU tensors; else empty.
        gradient: Per layer name, the mean probe gradient ``g_b`` (``D_b``, float64, in
            ``named_parameters`` order, on the network's device).
        directions: With ``keep_directions=True``: per structure name, one dict per damping
            value (in the order of the settings' dampings) mapping each layer name to
            ``(F̃⁻¹g, ẼF⁻¹g)`` with ``F̃ = F_S + λI`` and ``ẼF = EF_S + λI`` restricted to
            the layer (float64, ``D_b`` each, ``named_parameters`` order); else empty.
    """

    scalars: dict[str, float]
    layers: list[LayerInfo]
    diagonals: dict[str, tuple[Tensor, Tensor]]
    settings: dict
    notes: list[str] = field(default_factory=list)
    blocks: dict[str, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)
    coverage: list[dict] = field(default_factory=list)
    gradient: dict[str, Tensor] = field(default_factory=dict)
    directions: dict[str, list[dict[str, tuple[Tensor, Tensor]]]] = field(default_factory=dict)

    def __getitem__(self, key: str) -> float:
        """Return the scalar stored under ``key``.

        Raises:
            KeyError: Naming the closest keys and the structures, metrics and layers this
                measurement has.
        """
        try:
            return self.scalars[key]
        except KeyError:
            raise KeyError(self._missing(key)) from None

    def _missing(self, key: object) -> str:
        text = str(key)
        close = difflib.get_close_matches(text, list(self.scalars), n=3, cutoff=0.6)
        parsed = [keys.parse_key(k) for k in self.scalars]
        found = [p for p in parsed if p is not None]
        structures = sorted({p.structure for p in found})
        metrics = sorted({p.metric for p in found})
        layers = [*self.layer_names, keys.ALL]
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        return (
            f"No scalar {text!r}.{hint} Keys are '{{structure}}/{{metric}}/{{layer}}' with "
            f"structure in {structures}, metric in {metrics}, layer in {layers}, or "
            "'probe/{loss,batch_size,grad_norm,seconds}'."
        )

    def __contains__(self, key: object) -> bool:
        return key in self.scalars

    def __iter__(self) -> Iterator[str]:
        """Iterate over the scalar keys (as a mapping does)."""
        return iter(self.scalars)

    def __len__(self) -> int:
        return len(self.scalars)

    def keys(self) -> list[str]:
        """The scalar keys, in the order they were computed."""
        return list(self.scalars)

    def get(self, key: str, default: float | None = None) -> float | None:
        """The scalar under ``key``, or ``default``."""
        return self.scalars.get(key, default)

    def items(self) -> list[tuple[str, float]]:
        """``(key, value)`` pairs of the scalars."""
        return list(self.scalars.items())

    @property
    def layer_names(self) -> list[str]:
        """Names of the measured layers, forward order."""
        return [layer.name for layer in self.layers]

    @property
    def structures(self) -> list[str]:
        """The structures measured, in the order asked for."""
        return list(self.settings.get("structures", []))

    def to_dict(self) -> dict:
        """Plain data (JSON-serialisable): scalars as floats, layers, settings, notes, coverage.

        Tensors (diagonals, blocks, gradients, directions) are left out.
        """
        return {
            "scalars": {key: float(value) for key, value in self.scalars.items()},
            "layers": [
                {
                    "name": layer.name,
                    "type": layer.module_type,
                    "parameters": list(layer.parameter_names),
                    "dimension": layer.dimension,
                }
                for layer in self.layers
            ],
            "settings": dict(self.settings),
            "notes": list(self.notes),
            "coverage": [dict(entry) for entry in self.coverage],
        }

    def _suffix(self) -> str:
        damping = self.settings.get("damping", 0.0)
        several = isinstance(damping, (list, tuple)) and len(damping) > 1
        first = damping[0] if isinstance(damping, (list, tuple)) else damping
        return keys.damping_suffix(first, several)

    def table(self, structure: str | None = None) -> str:
        """The per-layer table (the same as the report's): one row per layer and ``all``.

        Args:
            structure: Which structure to show; by default block, else kron, else diag.

        Returns:
            The table as text.
        """
        structure = structure or keys.primary_structure(self.structures)
        if structure not in self.structures:
            raise ValueError(
                f"Invalid structure: {structure!r}. This measurement has {self.structures}."
            )
        return tables.layer_table(self.scalars, self.layer_names, structure, self._suffix())

    def _records(self) -> list[dict[str, Any]]:
        """One record per scalar (standard errors beside their value), for a data frame."""
        errors = {}
        for key, value in self.scalars.items():
            parsed = keys.parse_key(key)
            if parsed is not None and parsed.stderr:
                damping = f"@{parsed.damping}" if parsed.damping else ""
                value_key = keys.metric_key(parsed.structure, parsed.metric, parsed.layer, damping)
                errors[value_key] = float(value)
        records = []
        for key, value in self.scalars.items():
            parsed = keys.parse_key(key)
            if parsed is None:  # probe/…
                group, _, name = key.partition("/")
                records.append(
                    {
                        "key": key,
                        "structure": group,
                        "metric": name,
                        "layer": None,
                        "damping": None,
                        "value": float(value),
                        "stderr": None,
                    }
                )
            elif not parsed.stderr:
                records.append(
                    {
                        "key": key,
                        "structure": parsed.structure,
                        "metric": parsed.metric,
                        "layer": parsed.layer,
                        "damping": parsed.damping,
                        "value": float(value),
                        "stderr": errors.get(key),
                    }
                )
        return records

    def to_dataframe(self, structure: str | None = None) -> Any:
        """The scalars as a pandas ``DataFrame`` (pandas is an optional dependency).

        Args:
            structure: ``None`` for every scalar, one row each (columns ``key``,
                ``structure``, ``metric``, ``layer``, ``damping``, ``value`` and ``stderr``,
                the standard error of an estimated value, else missing; ``probe/…``
                scalars have the structure ``"probe"``); or ``"diag"``, ``"block"`` or
                ``"kron"`` for that structure's per-layer table (the rows of
                :meth:`table`, indexed by layer with ``all`` last; one column per metric,
                ``{metric}_se`` beside estimated ones; the first damping).

        Returns:
            The ``pandas.DataFrame``.

        Raises:
            ImportError: When pandas is not installed (the message says how to install it).
            ValueError: For a structure this measurement does not have.
        """
        try:
            import pandas
        except ImportError:
            raise ImportError(
                "Measurement.to_dataframe() needs pandas, which is not installed: "
                "pip install pandas (or pip install 'fisher-monitor[pandas]')."
            ) from None
        if structure is None:
            return pandas.DataFrame.from_records(
                self._records(),
                columns=["key", "structure", "metric", "layer", "damping", "value", "stderr"],
            )
        if structure not in self.structures:
            raise ValueError(
                f"Invalid structure: {structure!r}. This measurement has {self.structures}."
            )
        metrics = (*keys.METRICS, *keys.UPDATE_METRICS)
        columns = [tables.Column(metric, metric) for metric in metrics]
        rows = tables.layer_rows(self.scalars, self.layer_names, structure, self._suffix(), columns)
        frame = pandas.DataFrame.from_records(rows).set_index("layer")
        return frame.dropna(axis="columns", how="all")

    def _repr_html_(self) -> str:
        """The measurement as an HTML table, for notebooks (names escaped)."""
        structure = keys.primary_structure(self.structures)
        if structure is None:
            return f"<pre>{html.escape(repr(self))}</pre>"
        rows = tables.layer_rows(self.scalars, self.layer_names, structure, self._suffix())
        headings = ["layer", *(column.heading for column in tables.LAYER_COLUMNS)]
        head = "".join(f"<th>{html.escape(h)}</th>" for h in headings)
        body = "".join(
            "<tr>"
            + "".join(f"<td>{html.escape(cell)}</td>" for cell in tables.row_cells(row))
            + "</tr>"
            for row in rows
        )
        samples = self.scalars.get(keys.probe_key("batch_size"), 0)
        caption = (
            f"fisher-monitor measurement: {html.escape(structure)} structure (of "
            f"{html.escape(', '.join(self.structures))}), {len(self.layers)} layers, "
            f"N = {samples:g}; F̃ = F + λI, ẼF = EF + λI (terms: docs/glossary.md)"
        )
        notes = "".join(f"<li>{html.escape(note)}</li>" for note in self.notes)
        return (
            f"<table><caption>{caption}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>" + (f"<p>Notes:</p><ul>{notes}</ul>" if notes else "")
        )

    def __repr__(self) -> str:
        structure = keys.primary_structure(self.structures)
        suffix = self._suffix()
        headline = []
        for metric in ("direction_cosine", "trace_ratio", "rel_error", "kl"):
            damped = suffix if metric in keys.DAMPED_METRICS else ""
            value = self.scalars.get(keys.metric_key(str(structure), metric, keys.ALL, damped))
            if value is not None:
                headline.append(f"{metric}={tables.format_number(value, metric)}")
        layers = self.layer_names
        shown = ", ".join(map(repr, layers[:4]))
        shown += f", … ({len(layers)} layers)" if len(layers) > 4 else ""
        return (
            f"Measurement(structures={self.structures}, layers=[{shown}], "
            f"{structure}/all: {', '.join(headline)}, N={self.scalars.get('probe/batch_size', 0):g}"
            f"{', notes=' + str(len(self.notes)) if self.notes else ''})"
        )
