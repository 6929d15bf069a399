"""Structures of F and EF, one folder each, registered by name.

- ``diag`` (:class:`~fisher_monitor.structures.diag.Diagonal`),
- ``block`` (:class:`~fisher_monitor.structures.block.Block`),
- ``kron`` (:class:`~fisher_monitor.structures.kron.Kronecker`).

The contract is :class:`~fisher_monitor.structures.base.Structure`; :func:`register` adds
one (its name becomes valid in ``structures=`` and in the key format).
"""

from __future__ import annotations

from fisher_monitor import keys
from fisher_monitor.structures.base import (
    LayerInput,
    LayerResult,
    NumericalHealth,
    Structure,
    StructureUnavailable,
)
from fisher_monitor.structures.block import Block
from fisher_monitor.structures.diag import Diagonal
from fisher_monitor.structures.kron import Kronecker

#: Every structure by its name, in the order reports list them.
STRUCTURES: dict[str, type[Structure]] = {cls.name: cls for cls in (Diagonal, Block, Kronecker)}


def register(cls: type[Structure]) -> type[Structure]:
    """Register a structure (usable as a class decorator): ``structures=(cls.name,)`` works.

    Raises:
        TypeError: If ``cls`` is not a :class:`Structure` subclass.
        ValueError: If its name is taken by another structure or is not a valid key part.
    """
    if not (isinstance(cls, type) and issubclass(cls, Structure)):
        raise TypeError(f"Only Structure subclasses can be registered, got {cls!r}.")
    existing = STRUCTURES.get(cls.name)
    if existing is not None and not _same_definition(existing, cls):
        raise ValueError(f"A structure named {cls.name!r} is registered already: {existing!r}.")
    keys.register_structure(cls.name)
    STRUCTURES[cls.name] = cls
    return cls


def _same_definition(a: type, b: type) -> bool:
    """Whether ``b`` is ``a`` or ``a`` defined again (a notebook cell run twice)."""
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


__all__ = [
    "STRUCTURES",
    "Block",
    "Diagonal",
    "Kronecker",
    "LayerInput",
    "LayerResult",
    "NumericalHealth",
    "Structure",
    "StructureUnavailable",
    "register",
]
