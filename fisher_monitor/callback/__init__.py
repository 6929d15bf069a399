"""The Lightning callback: :class:`FisherMonitor` and the modules it delegates to.

- :mod:`~fisher_monitor.callback.monitor`: the callback (Lightning hooks and state);
- :mod:`~fisher_monitor.callback.arguments`: checks of its arguments;
- :mod:`~fisher_monitor.callback.batches`: probe batches from training batches;
- :mod:`~fisher_monitor.callback.discovery`: the network and the loss;
- :mod:`~fisher_monitor.callback.collective`: one measurement on every process (DDP);
- :mod:`~fisher_monitor.callback.failures`: one warning per cause, retry or switch off;
- :mod:`~fisher_monitor.callback.update`: the optimizer's applied update (the audit);
- :mod:`~fisher_monitor.callback.writers`, :mod:`~fisher_monitor.callback.tensorboard`,
  :mod:`~fisher_monitor.callback.layout`: where results go;
- :mod:`~fisher_monitor.callback.history`, :mod:`~fisher_monitor.callback.summary`,
  :mod:`~fisher_monitor.callback.timing`: what the monitor remembers and tells.
"""

from fisher_monitor.callback.batches import default_batch_to_inputs_targets
from fisher_monitor.callback.monitor import DEFAULT_LOG_PREFIX, IMAGE_EVERY, FisherMonitor

__all__ = [
    "DEFAULT_LOG_PREFIX",
    "IMAGE_EVERY",
    "FisherMonitor",
    "default_batch_to_inputs_targets",
]
