"""The run-information file: what the callback measured and how, read back by the report.

Scalars go through the user's loggers; the settings, the layers (coverage), the notes and
the end-of-fit summary go, as JSON, into a file next to the TensorBoard event files:
``fisher_monitor-{prefix}.json`` (the prefix with anything but letters, digits, ``-`` and
``_`` replaced by ``_``). The report reads it back as data; nothing is parsed out of
Markdown. Standard library only: the report must not import torch.

Schema (``"version": 1``)::

    {
      "format": "fisher-monitor-run",
      "version": 1,
      "prefix": "fisher",
      "settings": {"structures": [...], "fisher": "exact", "mc_samples": 1,
                   "damping": 0.001, "damping_mode": "relative", "schedule": "...", ...},
      "layers": [{"layer": "fc1", "type": "Linear", "parameters": ["fc1.weight", ...],
                  "dimension": 1234, "backend": "backpack", "measured": true,
                  "reason": null}, ...],
      "notes": ["..."],
      "fit": {"measurements": 12, "steps": [0, 1, ...], "monitor_seconds": 1.2,
              "fit_seconds": 30.0, "overhead": 0.04, ...}      # at the end of fitting
    }

Unknown keys are kept and ignored by readers, so later versions may add fields.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

FORMAT = "fisher-monitor-run"
VERSION = 1
_GLOB = "fisher_monitor-*.json"


def file_name(prefix: str) -> str:
    """The file name for a logging prefix, e.g. ``fisher_monitor-fisher.json``."""
    slug = re.sub(r"[^A-Za-z0-9_-]", "_", prefix) or "_"
    return f"fisher_monitor-{slug}.json"


def write(directory: str | Path, info: dict[str, Any]) -> Path:
    """Write (or replace) the run information for ``info["prefix"]`` atomically.

    Args:
        directory: The run directory (a TensorBoard logger's ``log_dir``).
        info: The data; ``format``, ``version`` are filled in.

    Returns:
        The path written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "version": VERSION, **info}
    path = directory / file_name(str(info["prefix"]))
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".fisher_monitor-", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(data, stream, indent=1, default=_plain, allow_nan=True)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read(directory: str | Path) -> dict[str, dict[str, Any]]:
    """Read every run-information file of a directory.

    Args:
        directory: A run directory.

    Returns:
        Per logging prefix, the stored data. Files that are not valid JSON of this
        format are skipped (a run without the file is still reported from its scalars).
    """
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(directory).glob(_GLOB)):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("format") == FORMAT and "prefix" in data:
            found[str(data["prefix"])] = data
    return found


def _plain(value: Any) -> Any:
    """JSON fallback for values that are not plain data (enums, paths, tuples of those)."""
    if hasattr(value, "value"):
        return value.value
    return str(value)


__all__ = ["FORMAT", "VERSION", "file_name", "read", "write"]
