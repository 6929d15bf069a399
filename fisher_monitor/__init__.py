"""fisher-monitor: how far is the empirical Fisher from the Fisher, on your model, as it trains.

Public API:

- :func:`measure` / :class:`Measurement`: F against EF on one probe batch;
- :class:`FisherMonitor`: the PyTorch Lightning callback;
- :mod:`fisher_monitor.schedules`: ``every(n)`` and ``log_spaced(...)``.
"""

from fisher_monitor import schedules
from fisher_monitor.callback import FisherMonitor
from fisher_monitor.measure import Measurement, Measurer, measure

__version__ = "0.1.0.dev0"

__all__ = ["FisherMonitor", "Measurement", "Measurer", "__version__", "measure", "schedules"]
