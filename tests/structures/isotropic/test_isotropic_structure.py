"""A new structure is one folder plus one registry line (the example of the guide).

The ``isotropic`` structure of this folder is registered here, without touching any module
of the package, and is then measured like the built-in ones: by ``measure()``, in the key
format, and in a ``Trainer.fit`` with the callback; its numbers equal the dense definitions.
"""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from isotropic_structure import Isotropic
from torch import nn

import reference
from fisher_monitor import FisherMonitor, keys, measure
from fisher_monitor.structures import STRUCTURES, register
from lightning_helpers import SpyLogger, TinyClassifier, loader, trainer_kwargs

register(Isotropic)  # the one registry line


def dense_isotropic(model, loss, inputs, targets, dampings):
    """The metrics of F_S = (tr F_b / D_b) I per layer, from the brute-force F and EF."""
    F = reference.fisher(model, loss, inputs, targets)
    per_sample = reference.per_sample_gradients(model, loss, inputs, targets)
    EF = reference.empirical_fisher(per_sample)
    slices = reference.layer_slices(model)
    diagonal_f, diagonal_ef = torch.zeros_like(F), torch.zeros_like(EF)
    for part in slices.values():
        size = part.stop - part.start
        for matrix, target in ((F, diagonal_f), (EF, diagonal_ef)):
            block = torch.eye(size, dtype=F.dtype) * torch.trace(matrix[part, part]) / size
            target[part, part] = block
    expected = {}
    for damping in dampings:
        for name, part in [*slices.items(), (keys.ALL, slice(0, F.shape[0]))]:
            lam = torch.cat(
                [
                    torch.full(
                        (s.stop - s.start,), damping * torch.trace(F[s, s]) / (s.stop - s.start)
                    )
                    for s in slices.values()
                    if s.start >= part.start and s.stop <= part.stop
                ]
            ).double()
            values = reference.dense_metrics(
                diagonal_f[part, part], diagonal_ef[part, part], per_sample[:, part], lam
            )
            suffix = keys.damping_suffix(damping, len(dampings) > 1)
            for metric, value in values.items():
                if metric in keys.UNDAMPED_METRICS and damping != dampings[0]:
                    continue
                tail = "" if metric in keys.UNDAMPED_METRICS else suffix
                expected[keys.metric_key("isotropic", metric, name, tail)] = value
    return expected


def test_a_registered_structure_is_measured_like_a_built_in_one():
    assert STRUCTURES["isotropic"] is Isotropic and "isotropic" in keys.registered_structures()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    loss = nn.CrossEntropyLoss()
    dampings = [1e-3, 1e-1]
    m = measure(model, loss, x, y, structures=("isotropic", "diag"), damping=dampings)
    expected = dense_isotropic(model, loss, x, y, dampings)
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert keys.parse_key("isotropic/kl@0.1/all").structure == "isotropic"
    assert m.coverage[0]["estimator"] == {"isotropic": "exact", "diag": "exact"}


def test_a_registered_structure_in_a_fit():
    logger = SpyLogger()
    monitor = FisherMonitor(every_n_steps=1, structures=("isotropic",))
    trainer = pl.Trainer(max_steps=2, logger=logger, callbacks=[monitor], **trainer_kwargs())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TinyClassifier(), loader())
    assert logger.steps_with("~fisher/isotropic/direction_cosine/all") == [0, 1]


def test_registering_is_checked():
    with pytest.raises(TypeError, match="Only Structure subclasses"):
        register(dict)

    class Clash(Isotropic):
        pass

    with pytest.raises(ValueError, match="registered already"):
        register(Clash)
    with pytest.raises(ValueError, match="reserved"):
        keys.register_structure("probe")
