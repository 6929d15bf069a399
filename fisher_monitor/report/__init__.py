"""Post-hoc reports from the logs alone: load -> verdicts -> figures -> HTML/Markdown/JSON."""

from fisher_monitor.report.load import ReportError, Run, load_runs
from fisher_monitor.report.render import summary, write_report
from fisher_monitor.report.verdict import THRESHOLDS, Verdict, verdicts

__all__ = [
    "THRESHOLDS",
    "ReportError",
    "Run",
    "Verdict",
    "load_runs",
    "summary",
    "verdicts",
    "write_report",
]
