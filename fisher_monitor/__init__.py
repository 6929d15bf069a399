"""fisher-monitor: how far is the empirical Fisher from the Fisher, on your model, as it trains.

Public API:

- :func:`measure` / :class:`Measurement`: F against EF on one probe batch;
- :class:`FisherMonitor`: the PyTorch Lightning callback;
- :mod:`fisher_monitor.schedules`: ``budget(...)``, ``every(n)`` and ``log_spaced(...)``.

The names are imported on first use, so that ``fisher_monitor.report`` and the
``fisher-monitor`` command never load torch, Lightning or BackPACK.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

#: Public name -> module that defines it.
_EXPORTS = {
    "FisherMonitor": "fisher_monitor.callback",
    "Measurement": "fisher_monitor.measurement",
    "Measurer": "fisher_monitor.engine",
    "measure": "fisher_monitor.engine",
    "schedules": "fisher_monitor.schedules",
}

if TYPE_CHECKING:  # pragma: no cover
    from fisher_monitor import schedules
    from fisher_monitor.callback import FisherMonitor
    from fisher_monitor.engine import Measurer, measure
    from fisher_monitor.measurement import Measurement


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fisher_monitor' has no attribute {name!r}")
    value = importlib.import_module(module)
    if name != "schedules":
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["FisherMonitor", "Measurement", "Measurer", "__version__", "measure", "schedules"]
