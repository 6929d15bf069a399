"""Test configuration: small, reproducible CPU runs."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("PYTHONHASHSEED", "0")
torch.set_num_threads(min(2, torch.get_num_threads()))
