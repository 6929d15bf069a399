"""The BackPACK backend: the only code that imports BackPACK (see :mod:`.network`)."""

from fisher_monitor.backends.backpack.network import BackpackNetwork

__all__ = ["BackpackNetwork"]
