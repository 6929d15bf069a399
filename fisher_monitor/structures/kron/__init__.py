"""``kron``: a Kronecker-factored Fisher against the exact EF block (:mod:`.structure`)."""

from fisher_monitor.structures.kron.structure import Kronecker

__all__ = ["Kronecker"]
