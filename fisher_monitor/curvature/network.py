"""Transitional re-exports (removed once every caller imports the new modules)."""

from fisher_monitor.curvature.layers import LayerInfo, find_layers, is_lazy
from fisher_monitor.curvature.passes import check_outputs, forked_rng, seed_from

__all__ = ["LayerInfo", "check_outputs", "find_layers", "forked_rng", "is_lazy", "seed_from"]
