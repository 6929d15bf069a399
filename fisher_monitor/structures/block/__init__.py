"""``block``: the exact per-layer blocks of F and EF (:mod:`.structure` and its routes)."""

from fisher_monitor.structures.block.structure import Block

__all__ = ["Block"]
