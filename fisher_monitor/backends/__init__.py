"""Backends: a prepared copy of the caller's network that delivers per-layer factors.

- :mod:`~fisher_monitor.backends.base`: the contract (:class:`Backend`);
- :mod:`~fisher_monitor.backends.registry`: the registry and ``backend="auto"``;
- :mod:`~fisher_monitor.backends.backpack`, :mod:`~fisher_monitor.backends.functorch`:
  the backends;
- :mod:`~fisher_monitor.backends.model_copy`: the hook-free copy they all start from;
- :mod:`~fisher_monitor.backends.pass_context`: RNG, precision and checks of one pass.
"""

from fisher_monitor.backends.base import Backend, LayerCallback, UnsupportedNetworkError
from fisher_monitor.backends.registry import (
    AUTO_ORDER,
    BACKENDS,
    LABELS,
    REGISTRY,
    auto_order,
    backend_names,
    check_backend,
    fallback,
    is_backend_failure,
    is_backpack_failure,
    prepare,
    register_backend,
)

__all__ = [
    "AUTO_ORDER",
    "auto_order",
    "backend_names",
    "register_backend",
    "BACKENDS",
    "LABELS",
    "REGISTRY",
    "Backend",
    "LayerCallback",
    "UnsupportedNetworkError",
    "check_backend",
    "fallback",
    "is_backend_failure",
    "is_backpack_failure",
    "prepare",
]
