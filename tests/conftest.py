"""Test configuration: small, reproducible CPU runs."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("PYTHONHASHSEED", "0")
torch.set_num_threads(min(2, torch.get_num_threads()))

from hypothesis import settings  # noqa: E402

# property tests are deterministic in CI; FISHER_MONITOR_HYPOTHESIS=explore searches anew
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("FISHER_MONITOR_HYPOTHESIS", "ci"))
