"""Post-hoc reports from the logs alone: load -> verdicts -> figures -> HTML/Markdown/JSON.

Nothing here imports torch, Lightning or BackPACK. The names below are imported on first
use, so that ``fisher-monitor --help`` does not load matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Public name -> module that defines it.
_EXPORTS = {
    "THRESHOLDS": "fisher_monitor.report.thresholds",
    "ReportError": "fisher_monitor.report.load",
    "Run": "fisher_monitor.report.load",
    "load_runs": "fisher_monitor.report.load",
    "summary": "fisher_monitor.report.render",
    "write_report": "fisher_monitor.report.render",
    "Verdict": "fisher_monitor.report.verdict",
    "headline": "fisher_monitor.report.verdict",
    "verdicts": "fisher_monitor.report.verdict",
}

if TYPE_CHECKING:  # pragma: no cover
    from fisher_monitor.report.load import ReportError, Run, load_runs
    from fisher_monitor.report.render import summary, write_report
    from fisher_monitor.report.thresholds import THRESHOLDS
    from fisher_monitor.report.verdict import Verdict, headline, verdicts


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fisher_monitor.report' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


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
