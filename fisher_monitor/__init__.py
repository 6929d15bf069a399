"""fisher-monitor: how far is the empirical Fisher from the Fisher, on your model, as it trains."""

from fisher_monitor.measure import Measurement, Measurer, measure

__version__ = "0.1.0.dev0"

__all__ = ["Measurement", "Measurer", "__version__", "measure"]
