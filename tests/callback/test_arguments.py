"""Invalid arguments are rejected at construction, naming the argument, the value and what
is allowed; valid ones are normalised."""

from __future__ import annotations

import pytest
from torch import nn

from fisher_monitor import FisherMonitor, schedules
from fisher_monitor.validation import check_memory_budget, check_solve_budget


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            dict(every_n_steps=3, schedule=schedules.every(3)),
            "either `every_n_steps` or `schedule`",
        ),
        (dict(every_n_steps=0), r"Invalid every_n_steps: 0\. Use a positive integer"),
        (dict(every_n_steps=2.5), r"Invalid every_n_steps: 2\.5"),
        (dict(every_n_steps=True), r"Invalid every_n_steps: True"),
        (dict(schedule=50), r"Invalid schedule: 50\. Pass a callable step -> bool"),
        (dict(log_prefix=""), r"Invalid log_prefix: ''\. Use a non-empty string"),
        (dict(log_prefix="/"), r"Invalid log_prefix: '/'"),
        (dict(log_prefix=3), r"Invalid log_prefix: 3"),
        (
            dict(memory_budget="1 gigabyte"),
            r"Invalid memory_budget: '1 gigabyte'\. Use a number of bytes",
        ),
        (dict(memory_budget=0), r"Invalid memory_budget: 0"),
        (dict(memory_budget=-5), r"Invalid memory_budget: -5"),
        (dict(memory_budget=1.5e9), r"Invalid memory_budget: 1500000000\.0"),
        (dict(memory_budget="0MB"), r"Invalid memory_budget: '0MB'"),
        (dict(solve_budget=-1), r"Invalid solve_budget: -1\. Use a number of training steps ≥ 0"),
        (dict(solve_budget=float("nan")), r"Invalid solve_budget: nan"),
        (dict(solve_budget="1000"), r"Invalid solve_budget: '1000'"),
        (dict(solve_budget=True), r"Invalid solve_budget: True"),
        (dict(probe_size=0), r"Invalid probe_size: 0\. Use a positive integer"),
        (dict(probe_size=8.0), r"Invalid probe_size: 8\.0"),
        (dict(probe_data=[1, 2, 3]), r"Invalid probe_data: a list\. Pass a DataLoader"),
        (
            dict(batch_to_inputs_targets="x"),
            r"Invalid batch_to_inputs_targets: 'x'\. Pass a callable",
        ),
        (dict(network=3), r"Invalid network: 3\. Pass None"),
        (dict(network=""), r"Invalid network: ''"),
        (dict(prog_bar="direction_cosine"), r"Invalid prog_bar key: 'direction_cosine'"),
        (dict(prog_bar="kron/kl/all"), r"Invalid prog_bar key: 'kron/kl/all'.*\(diag, block\)"),
        (dict(prog_bar="block/dimension/all"), r"Invalid prog_bar key: 'block/dimension/all'"),
        (dict(prog_bar="probe/speed"), r"Invalid prog_bar key: 'probe/speed'"),
        (
            dict(prog_bar="block/kl@0.5/all", damping=[0.1, 0.2]),
            r"Invalid prog_bar key: 'block/kl@0.5/all'",
        ),
        (dict(prog_bar=[3]), r"Invalid prog_bar key: 3"),
        (dict(log_histograms="yes"), r"Invalid log_histograms: 'yes'\. Use True or False"),
        (dict(raise_on_error=1), r"Invalid raise_on_error: 1"),
        (dict(seed=-1), r"Invalid seed: -1\. Use an integer ≥ 0"),
        (dict(optimizer_index=-1), r"Invalid optimizer_index: -1"),
        (
            dict(backend="jax"),
            r"Invalid backend: 'jax'\. Supported: \('auto', 'backpack', 'autograd', 'functorch'\)",
        ),
        (dict(structures=("full",)), "Invalid structure: 'full'"),
        (dict(loss_fn=nn.L1Loss()), "Unsupported loss 'L1Loss'"),
    ],
)
def test_invalid_arguments_are_rejected_at_construction(arguments, message):
    with pytest.raises(ValueError, match=message):
        FisherMonitor(**arguments)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (1, 1),
        (2**30, 2**30),
        ("1GB", 10**9),
        ("1 gb", 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5GiB", 3 * 2**29),
        ("2kB", 2000),
        ("100", 100),
        ("64 B", 64),
    ],
)
def test_memory_budget_sizes(value, expected):
    assert check_memory_budget(value) == expected
    if value is not None:
        assert FisherMonitor(memory_budget=value).memory_budget == expected


def test_valid_arguments_are_normalised():
    monitor = FisherMonitor(
        every_n_steps=7,
        log_prefix="monitor/fisher/",
        prog_bar=["monitor/fisher/block/direction_cosine/all", "probe/loss"],
    )
    assert repr(monitor.schedule) == "every(7, offset=0)"
    assert monitor.log_prefix == "monitor/fisher"
    assert monitor.prog_bar == ["block/direction_cosine/all", "probe/loss"]
    assert repr(FisherMonitor().schedule) == "budget(fraction=0.05, per_decade=10, minimum=8)"
    several = FisherMonitor(damping=[0.1, 0.2], prog_bar="block/kl@0.2/all")
    assert several.prog_bar == ["block/kl@0.2/all"]


@pytest.mark.parametrize("value", [None, 0, 100, 2.5e4, float("inf")])
def test_valid_solve_budgets_are_kept_as_numbers_of_steps(value):
    assert check_solve_budget(value) == (None if value is None else float(value))
    assert FisherMonitor(solve_budget=value).solve_budget == check_solve_budget(value)
