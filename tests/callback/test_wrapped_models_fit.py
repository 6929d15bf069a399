"""Real ``Trainer.fit`` runs with models from ordinary practice (issue: "any model users
train"): a compiled submodule, parametrized weights, a scalar temperature and a binary
classifier with ``(N,)`` logits. Each is measured at every step, with the numbers of
``measure()`` on the same weights and batch, and training is unchanged."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from fisher_monitor import FisherMonitor, measure
from lightning_helpers import SpyLogger, TinyClassifier, fit, loader


class Compiled(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.net = torch.compile(self.net)


class WeightNormed(TinyClassifier):
    def __init__(self, parametrize):
        super().__init__()
        parametrize(self.net[0])


class Tempered(TinyClassifier):
    """Logits scaled by a learned 0-d temperature (CLIP's logit_scale)."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(0.1))

    def forward(self, x):
        return self.net(x) * self.logit_scale.exp()


class Binary(TinyClassifier):
    """One logit per sample, squeezed to (N,), with BCEWithLogitsLoss."""

    def __init__(self):
        super().__init__()
        self.net[-1] = nn.Linear(8, 1)
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return self.loss_fn(self(inputs), (targets > 0).float())


def binary_batches(batch):
    inputs, targets = batch
    return inputs, (targets > 0).float()


CASES = {
    "compiled": (Compiled, {}),
    "weight_norm": (lambda: WeightNormed(parametrizations.weight_norm), {}),
    "spectral_norm": (lambda: WeightNormed(parametrizations.spectral_norm), {}),
    "orthogonal": (lambda: WeightNormed(parametrizations.orthogonal), {}),
    "temperature": (Tempered, {"network": None}),
    "binary": (Binary, {"network": None, "batch_to_inputs_targets": binary_batches}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.slow
def test_fit_measures_the_model_at_every_step(case):
    factory, options = CASES[case]
    options = {"network": "net", **options}
    monitor = FisherMonitor(every_n_steps=1, structures=("diag", "block"), **options)
    torch.manual_seed(0)
    start = factory()
    initial = copy.deepcopy(start)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, model, logger = fit(monitor, steps=3, model=start)
    problems = [str(w.message) for w in caught if "FisherMonitor" in str(w.message)]
    assert problems == []
    key = "~fisher/block/direction_cosine/all"
    assert logger.steps_with(key) == [0, 1, 2]
    # the first measurement equals measure() on the initial weights and the first batch
    network = initial if options["network"] is None else initial.net
    inputs, targets = next(iter(loader()))
    if case == "binary":
        targets = (targets > 0).float()
    expected = measure(network, initial.loss_fn, inputs, targets)
    assert logger.value(key, 0) == pytest.approx(expected["block/direction_cosine/all"], rel=1e-6)


@pytest.mark.parametrize("case", ["compiled", "weight_norm", "temperature"])
def test_training_is_unchanged_by_the_monitor(case):
    factory, options = CASES[case]
    options = {"network": "net", **options}

    def weights(monitor):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, model, _ = fit(monitor, steps=3, model=factory(), logger=SpyLogger())
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    with_monitor = weights(FisherMonitor(every_n_steps=1, **options))
    without = weights(None)
    assert with_monitor.keys() == without.keys()
    for name, value in without.items():
        assert torch.equal(with_monitor[name], value), name
