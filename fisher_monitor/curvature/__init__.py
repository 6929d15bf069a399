"""Per-layer factors of F and EF for one probe batch.

The only code that imports BackPACK or uses ``torch.func`` transforms on the model:

- :mod:`~fisher_monitor.curvature.layers`: which modules are layers, and their names;
- :mod:`~fisher_monitor.curvature.shadow`: the hook-free shadow copy of the network;
- :mod:`~fisher_monitor.curvature.backends`: the backend contract and registry;
- :mod:`~fisher_monitor.curvature.backpack_backend`, :mod:`~fisher_monitor.curvature.
  functorch_backend`: the two backends;
- :mod:`~fisher_monitor.curvature.factors`: the per-layer factor representations.
"""
