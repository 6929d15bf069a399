"""The optimizer-audit example runs in fast mode and logs what its figure needs."""

from __future__ import annotations

import math

import pytest

from examples_helpers import load


@pytest.mark.slow
def test_optimizer_audit_example_audits_three_optimizers(tmp_path, capsys):
    result = load("optimizer_audit").main(fast=True, root=tmp_path)
    out = capsys.readouterr().out
    assert result["figure"].exists() and result["figure"].parent == tmp_path
    numbers = result["optimizers"]
    assert set(numbers) == {"SGD (momentum 0.9)", "Adam", "diagonal natural gradient"}
    for name, entry in numbers.items():
        # measured at steps 0, 4 and 8 of the 12 steps, each audited after its step
        assert entry["measurements"] == 3, name
        for key in ("diag_nat", "block_nat", "diag_ef", "block_ef", "grad"):
            assert -1.0 <= entry[key] <= 1.0, (name, key)
        assert f"{name:>26}: median update_nat_cosine diag" in out
    # the natural-gradient optimizer, built on diag F, follows the diagonal natural
    # gradient more than the diagonal EF step, and the EF's block step least of all
    natural = numbers["diagonal natural gradient"]
    assert natural["diag_nat"] > natural["diag_ef"]
    assert natural["block_ef"] < min(
        numbers[n]["block_ef"] for n in numbers if n != "diagonal natural gradient"
    )
    # only Adam has a preconditioner to audit: cosines of non-negative vectors
    assert math.isnan(numbers["SGD (momentum 0.9)"]["preconditioner_fisher"])
    assert math.isnan(natural["preconditioner_fisher"])
    adam = result["adam_preconditioner"]
    assert adam["fisher"] == numbers["Adam"]["preconditioner_fisher"]
    assert 0.5 < adam["fisher"] <= 1.0 and 0.5 < adam["ef"] <= 1.0
    full = adam["full_set"]
    assert all(0.5 < full[key] <= 1.0 + 1e-12 for key in ("fisher", "ef", "minibatch"))
    assert not math.isnan(full["fisher_vs_ef"])
    assert "Adam's preconditioner √v̂ + ε" in out
