"""Comparisons of a measurement with the brute-force reference (:mod:`reference`)."""

from __future__ import annotations

import reference

RTOL = 1e-6
ATOL = 1e-9


def assert_matches(result: dict[str, float], expected: dict[str, float], rtol=RTOL, atol=ATOL):
    missing = sorted(set(expected) - set(result))
    assert not missing, f"keys missing from the measurement: {missing[:10]}"
    worst = (0.0, None)
    for key, want in expected.items():
        got = result[key]
        err = abs(got - want)
        assert err <= atol + rtol * abs(want), f"{key}: got {got!r}, reference {want!r}"
        if want != 0:
            worst = max(worst, (err / abs(want), key), key=lambda t: t[0])
    return worst


def reference_for(model, loss, inputs, targets, dampings, mode):
    per_sample = reference.per_sample_gradients(model, loss, inputs, targets)
    F = reference.fisher(model, loss, inputs, targets)
    slices = reference.layer_slices(model)
    out = {}
    for structure in ("diag", "block"):
        out.update(reference.reference_metrics(F, per_sample, slices, structure, dampings, mode))
    out.update(reference.kronecker_reference_metrics(model, loss, inputs, targets, dampings, mode))
    return out
