"""The step audit (``update_cosines``) against dense float64 references on a tiny network.

Expected values come from :mod:`audit_references` (dense F and EF by torch.func, full
``D × D`` solves), never from fisher_monitor's own code.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from audit_references import (
    LOSS,
    TOLERANCE,
    as_update,
    at,
    cosine,
    dense,
    expected_update_cosines,
    flat,
    full_directions,
    hand_measurement,
    last_update,
    make_batch,
    tiny_model,
    two_groups,
)

from fisher_monitor.audit import (
    preconditioner_audit,
    update_cosines,
)

STEP_OPTIMIZERS = {
    "SGD": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
    "SGD momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    "Adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
    "AdamW decay": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.5),
    "Adagrad": lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1),
    "RMSprop": lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-2, momentum=0.5),
    "Adam two groups": lambda m: torch.optim.Adam(
        two_groups(m, lr=1e-3, weight_decay=0.1), lr=1e-2
    ),
}


@pytest.mark.parametrize("dampings", [(1e-3,), (1e-3, 1e-1)], ids=["one damping", "two"])
@pytest.mark.parametrize("name", list(STEP_OPTIMIZERS))
def test_update_cosines_match_dense_reference(name, dampings):
    model = tiny_model()
    optimizer = STEP_OPTIMIZERS[name](model)
    batches = [make_batch(8, seed) for seed in range(3)]
    before, update = last_update(model, optimizer, batches)
    # the probe is the training batch of the measured step, at θ before that step
    d = dense(at(model, before), *batches[-1])
    measurement = hand_measurement(model, d, dampings=dampings)
    result = update_cosines(measurement, update)
    expected = expected_update_cosines(d, flat(update), ("diag", "block"), dampings)
    assert set(result) == set(expected)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=TOLERANCE), key


def test_natural_gradient_and_ef_steps_have_cosine_one():
    model = tiny_model()
    d = dense(model, *make_batch(8, 0))
    measurement = hand_measurement(model, d, dampings=(1e-2,))
    natural, empirical = full_directions(d, "block", 1e-2)
    result = update_cosines(measurement, as_update(model, -0.3 * natural))
    for scope in ("0", "2", "all"):
        assert result[f"block/update_nat_cosine/{scope}"] == pytest.approx(1.0, abs=1e-12)
        # the diagonal natural gradient is another direction
        assert result[f"diag/update_nat_cosine/{scope}"] < 0.999
    result = update_cosines(measurement, as_update(model, -0.3 * empirical))
    for scope in ("0", "2", "all"):
        assert result[f"block/update_ef_cosine/{scope}"] == pytest.approx(1.0, abs=1e-12)


def test_plain_sgd_on_the_probe_batch_follows_the_negative_gradient():
    model = tiny_model()
    batch = make_batch(8, 0)
    d = dense(model, *batch)
    measurement = hand_measurement(model, d)
    _, update = last_update(model, torch.optim.SGD(model.parameters(), lr=0.05), [batch])
    result = update_cosines(measurement, update)
    for structure, scope in itertools.product(("diag", "block"), ("0", "2", "all")):
        assert result[f"{structure}/update_grad_cosine/{scope}"] == pytest.approx(1.0, abs=1e-12)


def test_all_concatenates_layers_and_is_not_an_average():
    model = tiny_model()
    d = dense(model, *make_batch(8, 0))
    measurement = hand_measurement(model, d)
    # layer "0" gets a huge update along −g, layer "2" a tiny one against it
    s0, s2 = d.slices["0"], d.slices["2"]
    update = as_update(model, torch.cat([-100.0 * d.g[s0], 0.01 * d.g[s2]]))
    result = update_cosines(measurement, update)
    per_layer = [result["block/update_grad_cosine/0"], result["block/update_grad_cosine/2"]]
    assert per_layer == pytest.approx([1.0, -1.0], abs=1e-12)
    delta = flat(update)
    assert result["block/update_grad_cosine/all"] == pytest.approx(cosine(delta, -d.g), abs=1e-12)
    # ≈ ‖g_0‖/‖g‖ as layer "0" dominates the update; the average of the layers would be 0
    assert result["block/update_grad_cosine/all"] > 0.5


def test_update_cosines_errors_and_zero_update():
    model = tiny_model()
    d = dense(model, *make_batch(8, 0))
    measurement = hand_measurement(model, d)
    zero = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    result = update_cosines(measurement, zero)
    assert all(math.isnan(v) for v in result.values())

    partial = {n: v for n, v in zero.items() if n != "2.bias"}
    with pytest.raises(ValueError, match=r"no entry for the measured parameters \['2.bias'\]"):
        update_cosines(measurement, partial)
    wrong = {**zero, "0.bias": torch.zeros(5)}
    with pytest.raises(ValueError, match=r"update\['0.bias'\] has shape \(5,\)"):
        update_cosines(measurement, wrong)
    # unmeasured parameters are ignored
    assert set(update_cosines(measurement, {**zero, "other": torch.ones(2)})) == set(result)

    measurement.directions = {}
    with pytest.raises(ValueError, match="keep_directions=True"):
        update_cosines(measurement, zero)


# --- preconditioner audit ------------------------------------------------------------------


@pytest.mark.parametrize("dampings", [(1e-3,), (1e-3, 1e-1)], ids=["one damping", "two"])
def test_measure_keep_directions_gives_the_dense_update_cosines(dampings):
    from fisher_monitor import measure

    model = tiny_model()
    optimizer = torch.optim.AdamW(two_groups(model, lr=3e-3), lr=1e-2, weight_decay=0.1)
    batches = [make_batch(8, seed) for seed in range(3)]
    before, update = last_update(model, optimizer, batches)
    probe_model, (x, y) = at(model, before), batches[-1]
    damping = list(dampings) if len(dampings) > 1 else dampings[0]
    measurement = measure(
        probe_model, LOSS, x, y, structures=("diag", "block"), damping=damping, keep_directions=True
    )
    d = dense(probe_model, x, y)
    expected = expected_update_cosines(d, flat(update), ("diag", "block"), dampings)
    result = update_cosines(measurement, update)
    assert set(result) == set(expected)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=TOLERANCE), key
    # measure(update=...) logs the same cosines with the other metrics
    with_update = measure(
        probe_model, LOSS, x, y, structures=("diag", "block"), damping=damping, update=update
    )
    for key, value in expected.items():
        assert with_update[key] == pytest.approx(value, abs=TOLERANCE), key

    audit = preconditioner_audit(optimizer, dict(model.named_parameters()), measurement)
    denominator = torch.cat(list(audit.denominators.values()))
    for which, matrix in (("fisher", d.F), ("ef", d.EF)):
        assert audit.scalars[f"optimizer/preconditioner_{which}_cosine/all"] == pytest.approx(
            cosine(denominator, torch.diagonal(matrix).sqrt()), abs=TOLERANCE
        )
