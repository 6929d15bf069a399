"""The cost model counts time: the route each layer takes, and its estimate in the results."""

from __future__ import annotations

import torch
from torch import nn

from fisher_monitor import measure
from fisher_monitor.engine import cost
from fisher_monitor.factors import RATES, LayerShape, PassSize
from fisher_monitor.structures import Block


def test_every_measurement_carries_the_cost_models_estimate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    m = measure(model, nn.CrossEntropyLoss(), torch.randn(16, 10), torch.randint(0, 3, (16,)))
    estimate = m.settings["cost"]
    assert estimate["steps"] > 1 and estimate["seconds"] > 0 and estimate["peak_bytes"] > 0
    assert "estimator" not in m.settings


def test_the_block_cost_follows_the_route_and_its_precision():
    block = Block()
    wide = LayerShape("fc", "outer", 1, 785, 512, 785 * 512, 512, 2.0 * 785 * 512)
    exact = PassSize(128, 9, True)
    # float32 Gram and factorisation from 256 columns on: cheaper than five dampings' eigh
    mixed = block.flops(wide, exact)
    several = block.flops(wide, PassSize(128, 9, True, dampings=5))
    assert mixed < several
    # a 10-output layer with fewer parameters than columns: the dense route, no jump in N
    head = LayerShape("out", "outer", 1, 65, 10, 650, 10, 1300.0)
    small, large = (
        block.flops(head, PassSize(256, 9, True)),
        block.flops(head, PassSize(320, 9, True)),
    )
    assert large < 2.0 * small
    assert cost.seconds(RATES.gemm32_rate, threads=1) == 1.0
