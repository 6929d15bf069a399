"""``kron`` of layers applied at several positions, whose loss also has positions, against
the dense KFC reference (``reference.kronecker_reference``) on both backends with Kronecker
factors: ℓ_n sums a sample's positions for F, EF and G ⊗ A alike, so the reduction and T
change nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reference
from fisher_monitor import measure
from reference_checks import assert_matches


class SequenceTagger(nn.Module):
    """(N, T, I) → (N, C, T): two Linear layers applied at every position."""

    def __init__(self, inputs=3, hidden=4, classes=3):
        super().__init__()
        self.fc1 = nn.Linear(inputs, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))).transpose(1, 2)


def pointwise_convolutions():
    """(N, I, T) → (N, C, T): the same tagger as 1 × 1 convolutions, which BackPACK traces."""
    return nn.Sequential(nn.Conv1d(3, 4, 1), nn.Tanh(), nn.Conv1d(4, 3, 1))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    ("backend", "network"),
    [("autograd", "linear"), ("autograd", "conv"), ("backpack", "conv")],
)
def test_kron_with_positions_matches_the_reference(reduction, backend, network):
    torch.manual_seed(0)
    model = (SequenceTagger() if network == "linear" else pointwise_convolutions()).double()
    inputs = torch.randn(6, 5, 3, dtype=torch.float64)  # T = 5 positions
    if network == "conv":
        inputs = inputs.transpose(1, 2).contiguous()
    targets = torch.randint(0, 3, (6, 5))
    loss = nn.CrossEntropyLoss(reduction=reduction)
    found = measure(
        model, loss, inputs, targets, structures=("kron",), backend=backend, estimator="exact"
    )
    expected = reference.kronecker_reference_metrics(
        model, loss, inputs, targets, (1e-3,), "relative"
    )
    expected = {k: v for k, v in expected.items() if "/dimension/" not in k}
    assert_matches(found.scalars, expected)
