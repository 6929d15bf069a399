"""A tiny per-position classifier for the likelihood tests (BackPACK-compatible)."""

from __future__ import annotations

from torch import nn


class Transpose(nn.Module):
    """``(N, T, C)`` to ``(N, C, T)`` (pulled back by torch.func inside BackPACK's pass)."""

    def forward(self, x):
        return x.transpose(1, 2)


def sequence_model(classes: int = 4) -> nn.Module:
    """``(N, C, T)`` logits from ``(N, T, 3)`` features (a per-position head)."""
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, classes), Transpose())
