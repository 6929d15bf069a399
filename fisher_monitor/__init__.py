"""fisher-monitor: how far is the empirical Fisher from the Fisher, on your model, as it trains.

Public API:

- :func:`measure` / :class:`Measurement`: F against EF on one probe batch;
- :class:`FisherMonitor`: the PyTorch Lightning callback;
- :mod:`fisher_monitor.schedules`: ``budget(...)``, ``every(n)`` and ``log_spaced(...)``.

The names are imported on first use, so that ``fisher_monitor.report`` and the
``fisher-monitor`` command never load torch, Lightning or BackPACK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fisher_monitor.version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from fisher_monitor import schedules
    from fisher_monitor.callback import FisherMonitor
    from fisher_monitor.engine import Measurer, measure
    from fisher_monitor.measurement import Measurement

_LAZY = ("FisherMonitor", "Measurement", "Measurer", "measure", "schedules")


def _load(name: str) -> Any:
    """The public object ``name``, importing its module now."""
    if name == "FisherMonitor":
        from fisher_monitor.callback import FisherMonitor as value
    elif name == "Measurement":
        from fisher_monitor.measurement import Measurement as value
    elif name == "Measurer":
        from fisher_monitor.engine import Measurer as value
    elif name == "measure":
        from fisher_monitor.engine import measure as value
    else:
        from fisher_monitor import schedules as value
    return value


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fisher_monitor' has no attribute {name!r}")
    value = _load(name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["FisherMonitor", "Measurement", "Measurer", "__version__", "measure", "schedules"]
