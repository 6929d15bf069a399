"""``diag``: the diagonals of F and EF (:mod:`.structure`, :mod:`.statistics`, :mod:`.sketched`)."""

from fisher_monitor.structures.diag.structure import Diagonal

__all__ = ["Diagonal"]
