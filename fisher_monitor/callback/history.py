"""What the monitor remembers of its measurements: enough for the heat map and the verdicts.

Each measurement keeps the whole-network (``all``) values of every structure (at the first
damping), each structure's direction cosine per layer (the heat map's rows, the verdicts'
worst layer), the optimizer audit's ``all`` values and the probe loss: a few dozen floats,
saved in checkpoints. The end-of-fit verdicts are computed from it by the report package,
as from a log read back, so they use whatever was measured: a block structure whose
sketched Fisher has no direction cosine leaves the preconditioning verdict to the
diagonal's, as the report does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fisher_monitor import keys


class History:
    """Per measured step, the values the summary and the heat map need.

    Args:
        structure: The primary structure (the heat map's, when it logged direction cosines).
        suffix: The damping suffix of the first damping (``""`` with one damping).
    """

    def __init__(self, structure: str, suffix: str) -> None:
        self.structure = structure
        self.suffix = suffix
        self.records: list[tuple[int, dict[str, float]]] = []

    def __len__(self) -> int:
        return len(self.records)

    @property
    def steps(self) -> list[int]:
        """The measured steps, in order."""
        return [step for step, _ in self.records]

    def _kept(self, key: str) -> bool:
        if key == keys.probe_key("loss"):
            return True
        parsed = keys.parse_key(key)
        if parsed is None or parsed.stderr:
            return False
        if parsed.structure == keys.OPTIMIZER:
            return parsed.layer == keys.ALL
        suffix = f"@{parsed.damping}" if parsed.damping else ""
        if parsed.metric in keys.DAMPED_METRICS and suffix != self.suffix:
            return False
        return parsed.layer == keys.ALL or parsed.metric == "direction_cosine"

    def add(self, step: int, scalars: Mapping[str, float]) -> None:
        """Remember a measurement (keys without the prefix)."""
        kept = {k: float(v) for k, v in scalars.items() if self._kept(k) and math.isfinite(v)}
        self.records.append((step, kept))

    def extend(self, step: int, scalars: Mapping[str, float]) -> None:
        """Add values that arrive after the measurement (the optimizer audit) to its record."""
        for recorded_step, values in reversed(self.records):
            if recorded_step == step:
                values.update(
                    {k: float(v) for k, v in scalars.items() if self._kept(k) and math.isfinite(v)}
                )
                return

    def last(self) -> tuple[int, dict[str, float]] | None:
        """The last record."""
        return self.records[-1] if self.records else None

    def _heatmap_structure(self) -> str:
        """The primary structure, or the first (block, kron, diag) with direction cosines."""
        found = {
            parsed.structure
            for _, values in self.records
            for key in values
            if (parsed := keys.parse_key(key)) and parsed.metric == "direction_cosine"
        }
        if self.structure in found or not found:
            return self.structure
        return next(s for s in keys.PRIMARY_ORDER if s in found)

    def heatmap(self) -> tuple[list[int], list[str], np.ndarray, str]:
        """``(steps, layers, values, title)`` of the direction cosine, layers × steps."""
        metric = f"direction_cosine{self.suffix}"
        structure = self._heatmap_structure()
        steps = self.steps
        layers: list[str] = []
        for _, values in self.records:
            for key in values:
                parsed = keys.parse_key(key)
                if (
                    parsed
                    and parsed.metric == "direction_cosine"
                    and parsed.structure == structure
                    and parsed.layer not in layers
                ):
                    layers.append(parsed.layer)
        if keys.ALL in layers:  # the whole network last
            layers = [layer for layer in layers if layer != keys.ALL] + [keys.ALL]
        grid = np.full((len(layers), len(steps)), np.nan)
        for j, (_, values) in enumerate(self.records):
            for i, layer in enumerate(layers):
                grid[i, j] = values.get(keys.metric_key(structure, metric, layer), np.nan)
        title = f"{structure}: natural gradient vs EF step, cos(F̃⁻¹g, ẼF⁻¹g)"
        return steps, layers, grid, title

    def series(self) -> dict[str, list[tuple[int, float]]]:
        """Per key, its ``(step, value)`` pairs (the form the report's ``Run`` holds)."""
        series: dict[str, list[tuple[int, float]]] = {}
        for step, values in self.records:
            for key, value in values.items():
                series.setdefault(key, []).append((step, value))
        return series

    def verdicts(
        self, prefix: str, path: str | Path | None, settings: Mapping[str, Any] | None = None
    ) -> list[Any]:
        """The report's verdicts on these measurements (an in-memory run, no log read back).

        Args:
            prefix: The logging prefix.
            path: The run directory, if any (for the run's name in the verdicts).
            settings: The run's settings (e.g. the optimizer's name), if known.

        Returns:
            ``fisher_monitor.report`` verdicts (objects with ``topic``, ``level``, ``text``):
            the headline (topic ``"headline"``: what the numbers mean for this training's
            optimizer) first, then one per topic; empty without measurements.
        """
        if not self.records:
            return []
        from fisher_monitor.report.runs import Run
        from fisher_monitor.report.verdict import headline, verdicts

        run = Run(
            name="this fit",
            path=Path(path or "."),
            prefix=prefix,
            scalars=self.series(),
            settings=dict(settings or {}),
        )
        return [headline(run), *verdicts(run)]

    def state(self) -> list[tuple[int, dict[str, float]]]:
        """The records, for checkpoints."""
        return [(step, dict(values)) for step, values in self.records]

    def load(self, records: list[tuple[int, Mapping[str, float]]]) -> None:
        """Restore :meth:`state`'s records."""
        self.records = [(int(step), dict(values)) for step, values in records]
