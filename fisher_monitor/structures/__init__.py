"""Structures of F and EF, one module each, registered by name.

- ``diag`` (:class:`~fisher_monitor.structures.diag.Diagonal`),
- ``block`` (:class:`~fisher_monitor.structures.block.Block`),
- ``kron`` (:class:`~fisher_monitor.structures.kron.Kronecker`).
"""

from fisher_monitor.structures.base import (
    LayerInput,
    LayerResult,
    Structure,
    StructureUnavailable,
)
from fisher_monitor.structures.block import Block
from fisher_monitor.structures.diag import Diagonal
from fisher_monitor.structures.kron import Kronecker

#: Every structure by its name (the names of :data:`fisher_monitor.keys.STRUCTURES`).
STRUCTURES: dict[str, type[Structure]] = {cls.name: cls for cls in (Diagonal, Block, Kronecker)}

__all__ = [
    "STRUCTURES",
    "Block",
    "Diagonal",
    "Kronecker",
    "LayerInput",
    "LayerResult",
    "Structure",
    "StructureUnavailable",
]
