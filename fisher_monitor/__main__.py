"""``python -m fisher_monitor report ...``."""

from fisher_monitor.report.cli import entry_point

entry_point()
