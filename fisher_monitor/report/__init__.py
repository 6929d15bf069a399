"""Post-hoc reports from the logs alone: load -> verdicts -> figures -> HTML/Markdown/JSON.

Nothing here imports torch, Lightning or BackPACK. The names below are imported on first
use, so that ``fisher-monitor --help`` does not load matplotlib.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from fisher_monitor.report.load import ReportError, Run, load_runs
    from fisher_monitor.report.render import summary, write_report
    from fisher_monitor.report.thresholds import THRESHOLDS
    from fisher_monitor.report.verdict import Verdict, headline, verdicts

_LAZY = (
    "THRESHOLDS",
    "ReportError",
    "Run",
    "load_runs",
    "summary",
    "write_report",
    "Verdict",
    "headline",
    "verdicts",
)


def _module(name: str) -> Any:
    """The module that defines the public name ``name``, imported now."""
    if name == "THRESHOLDS":
        from fisher_monitor.report import thresholds as module
    elif name in ("ReportError", "Run", "load_runs"):
        from fisher_monitor.report import load as module
    elif name in ("summary", "write_report"):
        from fisher_monitor.report import render as module
    else:
        from fisher_monitor.report import verdict as module
    return module


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fisher_monitor.report' has no attribute {name!r}")
    value = getattr(_module(name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "THRESHOLDS",
    "ReportError",
    "Run",
    "Verdict",
    "headline",
    "load_runs",
    "summary",
    "verdicts",
    "write_report",
]
