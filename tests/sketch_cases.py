"""Shared problems of the sketched-estimator tests: tiny models, and one measurement."""

from __future__ import annotations

import torch
from torch import nn

from fisher_monitor.backends import prepare
from fisher_monitor.engine.pipeline import MeasureOptions, measure_once, plan_measurement
from fisher_monitor.likelihoods import resolve_loss
from fisher_monitor.settings import MeasureSettings

FISHER_INVERSE = ("kl", "direction_cosine", "nat_grad_cosine", "nat_projection")


def sequence_model(classes: int = 5) -> nn.Module:
    """Embedding → Linear over positions, outputs ``(N, C, T)`` (a tiny language model)."""

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(7, 3)
            self.out = nn.Linear(3, classes)

        def forward(self, tokens):
            return self.out(torch.tanh(self.embed(tokens))).transpose(1, 2)

    return Tagger().double()


def sequence_problem(n: int = 6, positions: int = 3, classes: int = 5, seed: int = 0):
    torch.manual_seed(seed)
    model = sequence_model(classes)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 7, (n, positions), generator=generator)
    targets = torch.randint(0, classes, (n, positions), generator=generator)
    return model, tokens, targets, nn.CrossEntropyLoss()


def classifier_problem(n: int = 8, classes: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, classes)).double()
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, classes, (n,), generator=generator)
    return model, inputs, targets, nn.CrossEntropyLoss()


def run(model, loss, inputs, targets, estimator="sketch", seed=1, backend="auto", **kw):
    settings = MeasureSettings.create(
        kw.pop("structures", ("diag", "block")),
        damping=kw.pop("damping", 1e-3),
        damping_mode=kw.pop("damping_mode", "relative"),
    )
    prepared = prepare(model, resolve_loss(loss), backend)
    try:
        options = MeasureOptions(seed=seed, estimator=estimator, **kw)
        return measure_prepared(prepared, settings, inputs, targets, options)
    finally:
        prepared.close()


def measure_prepared(prepared, settings, inputs, targets, options):
    """One measurement of a prepared network, planned as ``measure()`` plans it."""
    plan = plan_measurement(prepared, settings, inputs, targets.shape[0], options)
    return measure_once(prepared, settings, inputs, targets, options, plan)


def wide_classifier(classes: int = 2000, n: int = 64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, classes))
    inputs = torch.randn(n, 8)
    targets = torch.randint(0, classes, (n,))
    return model, inputs, targets
