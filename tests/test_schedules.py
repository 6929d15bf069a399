"""Schedules: every, log_spaced and the time budget (driven by a fake clock)."""

from __future__ import annotations

import pickle

import pytest

from fisher_monitor.schedules import TimedSchedule, budget, every, log_spaced, spread_steps


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(schedule: budget, clock: Clock, steps: int, step_seconds, cost_seconds) -> list[int]:
    """Training steps of ``step_seconds(step)``; a measurement costs ``cost_seconds(step)``."""
    schedule.start()
    measured = []
    for step in range(steps):
        if schedule(step):
            measured.append(step)
            cost = cost_seconds(step)
            clock.now += cost
            schedule.charge(cost)
        clock.now += step_seconds(step)
    return measured


def test_every_and_log_spaced():
    assert [s for s in range(10) if every(3)(s)] == [0, 3, 6, 9]
    assert [s for s in range(10) if every(4, offset=1)(s)] == [1, 5, 9]
    assert [s for s in range(60) if log_spaced(per_decade=4)(s)] == [0, 1, 2, 4, 6, 10, 18, 32, 57]
    spaced = log_spaced(per_decade=2, max_interval=50)
    assert all(spaced(s) for s in (100, 150, 200))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(n=0), "Invalid interval n: 0"),
        (dict(n=2.5), "Invalid interval n: 2.5"),
        (dict(n=2, offset=-1), "Invalid offset: -1"),
    ],
)
def test_every_rejects_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        every(**arguments)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(fraction=0), r"Invalid fraction: 0\. Use a share .* between 0 and 1"),
        (dict(fraction=1.0), "Invalid fraction: 1.0"),
        (dict(fraction=5), "Invalid fraction: 5"),
        (dict(fraction="5%"), "Invalid fraction: '5%'"),
        (dict(fraction=True), "Invalid fraction: True"),
        (dict(per_decade=0), "Invalid per_decade: 0"),
        (dict(clock=3.0), "Invalid clock: 3.0"),
        (dict(minimum=-1), r"Invalid minimum: -1\. Use a whole number"),
        (dict(minimum=2.5), "Invalid minimum: 2.5"),
    ],
)
def test_budget_rejects_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        budget(**arguments)


def test_budget_measures_the_first_step_then_within_the_budget():
    clock = Clock()
    schedule = budget(0.1, clock=clock)
    schedule.start()
    assert schedule(7)  # the first step seen, whatever its number
    schedule.charge(1.0)
    clock.now = 1.0 + 14.0  # 14 s of training
    assert not schedule(13)  # a log-spaced step: 1 + 0.5 > 0.1 · 14
    clock.now = 1.0 + 15.0
    assert schedule(13)  # 1 + 0.5 ≤ 0.1 · 15: half a measurement suffices on the grid ...
    assert not schedule(14)  # ... off the grid the whole next one must fit: 1 + 1 > 1.5
    clock.now = 1.0 + 20.0
    assert schedule(14)  # 1 + 1 ≤ 0.1 · 20


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.2])
@pytest.mark.parametrize("cost", [0.5, 3.0, 40.0])
def test_budget_share_stays_within_fraction_plus_half_a_measurement(fraction, cost):
    clock = Clock()
    schedule = budget(fraction, clock=clock)
    steps = simulate(schedule, clock, 20_000, lambda s: 1.0, lambda s: cost)
    training = 20_000.0
    spent = cost * len(steps)
    assert schedule.spent == pytest.approx(spent)
    assert spent <= fraction * training + cost / 2  # at every measurement, hence at the end
    # and it uses the budget: within one measurement of the fraction at the end
    assert spent >= fraction * training - 2 * cost
    # two measurements are at least half the budget's spacing apart (no bursts)
    assert all(b - a >= cost / fraction / 2 - 1 for a, b in zip(steps[1:], steps[2:], strict=False))


def test_budget_is_densest_early_and_adapts_to_the_measured_cost():
    clock = Clock()
    schedule = budget(0.05, clock=clock)
    # a measurement costs 1.5 training steps: ~9 measurements in 300 steps, some in each third
    steps = simulate(schedule, clock, 300, lambda s: 1.0, lambda s: 1.5)
    assert steps[0] == 0 and len(steps) >= 8
    assert all(any(100 * t <= s < 100 * (t + 1) for s in steps) for t in range(3))
    gaps = [b - a for a, b in zip(steps, steps[1:], strict=False)]
    assert gaps[0] > 0 and max(gaps[: len(gaps) // 2]) <= max(gaps) + 1
    # measurements that suddenly cost 10× more are made 10× less often
    clock = Clock()
    schedule = budget(0.05, clock=clock)
    steps = simulate(schedule, clock, 4000, lambda s: 1.0, lambda s: 1.0 if s < 2000 else 10.0)
    early = [s for s in steps if 1000 <= s < 2000]
    late = [s for s in steps if 3000 <= s < 4000]
    assert len(early) >= 5 * len(late) >= 5


def test_budget_reports_preparation_but_does_not_draw_it_from_the_budget():
    clock = Clock()
    schedule = budget(0.1, clock=clock)
    schedule.start()
    clock.now += 5.0
    schedule.charge(5.0, measurement=False, one_time=True)  # preparing the monitor
    assert schedule.last_cost is None and schedule(0)  # the first step is still measured
    schedule.charge(1.0)
    clock.now += 1.0
    assert schedule.last_cost == 1.0 and schedule.spent == 1.0 and schedule.setup == 5.0
    clock.now += 15.0  # 15 s of training: 1 + 0.5 ≤ 1.5, preparation not counted
    assert schedule(13)
    # other work of the monitor (the optimizer audit) is drawn from the budget
    schedule.charge(0.5, measurement=False)
    assert schedule.spent == 1.5 and schedule.last_cost == 1.0 and not schedule(13)
    assert budget(0.1).state_dict()["setup"] == 0.0


def test_budget_state_resumes_and_pickles():
    clock = Clock()
    schedule = budget(0.1, clock=clock)
    simulate(schedule, clock, 50, lambda s: 1.0, lambda s: 2.0)
    state = schedule.state_dict()
    assert state["elapsed"] == pytest.approx(clock.now)
    clock.now += 1000.0  # a restart much later: the gap is not training time
    resumed = budget(0.1, clock=clock)
    resumed.load_state_dict(state)
    resumed.start()
    assert resumed.spent == schedule.spent and resumed.last_cost == schedule.last_cost
    assert resumed.elapsed == pytest.approx(state["elapsed"])
    # a schedule sent to another process (ddp_spawn) keeps its time, not this clock's origin
    copied = pickle.loads(pickle.dumps(budget(0.1)))
    assert copied.spent == 0.0 and copied.elapsed == 0.0
    assert isinstance(schedule, TimedSchedule) and schedule.decided_on_rank_zero
    assert not isinstance(every(3), TimedSchedule)
    assert repr(schedule) == "budget(fraction=0.1, per_decade=10, minimum=8)"
    # the fit's length travels with the state: a resumed fit keeps the same guaranteed steps
    spread = budget(0.1, clock=clock)
    spread.expect_steps(300)
    again = budget(0.1, clock=clock)
    again.load_state_dict(spread.state_dict())
    assert again.guaranteed == spread.guaranteed and again.total_steps == 300


def test_spread_steps_are_dense_early_and_reach_the_end():
    steps = sorted(spread_steps(300, 8))
    assert steps == [0, 6, 24, 55, 98, 153, 220, 299]
    gaps = [b - a for a, b in zip(steps, steps[1:], strict=False)]
    assert gaps == sorted(gaps)  # growing gaps: densest early
    assert sum(s >= 150 for s in steps) >= 3  # the second half still gets a third of them
    assert spread_steps(5, 8) == frozenset(range(5))  # short fits: every step
    assert spread_steps(100, 1) == {0} and spread_steps(100, 0) == frozenset()
    for total in range(1, 400):  # never fewer than asked where the fit has room for them
        steps = spread_steps(total, 8)
        assert len(steps) == min(total, 8) and max(steps) == total - 1 and min(steps) == 0
    assert sorted(spread_steps(9, 8)) == [0, 1, 2, 3, 4, 5, 6, 8]


def test_guaranteed_steps_survive_jumps_and_checkpoints():
    """A step that jumps past a guaranteed one (several optimizers stepping manually, a
    failed attempt) measures in its place; a resumed fit does not measure them again."""
    schedule = budget(0.05, clock=Clock())
    schedule.expect_steps(300)
    schedule.start()
    schedule.charge(100.0)  # far over budget: only the guaranteed steps are measured
    measured = [s for s in range(0, 600, 2) if schedule(s)]
    assert measured == [0, 6, 24, 56, 98, 154, 220, 300]
    # resume after step 100: the guaranteed steps before it are not measured again
    first = budget(0.05, clock=Clock())
    first.expect_steps(300)
    first.start()
    first.charge(100.0)
    assert [s for s in range(101) if first(s)] == [0, 6, 24, 55, 98]
    resumed = budget(0.05, clock=Clock())
    resumed.load_state_dict(first.state_dict())
    resumed.expect_steps(None)  # the length is unknown at the resume: the saved one stays
    resumed.start()
    assert [s for s in range(101, 300) if resumed(s)] == [153, 220, 299]


def test_budget_guarantees_its_minimum_even_when_a_measurement_exceeds_the_budget():
    """A measurement 40× a step at 5%: the budget alone allows the first step only."""
    clock = Clock()
    alone = budget(0.05, minimum=0, clock=clock)
    assert simulate(alone, clock, 300, lambda s: 1.0, lambda s: 40.0) == [0]
    clock = Clock()
    guaranteed = budget(0.05, clock=clock)
    guaranteed.expect_steps(300)
    measured = simulate(guaranteed, clock, 300, lambda s: 1.0, lambda s: 40.0)
    assert measured == [0, 6, 24, 55, 98, 153, 220, 299]
    # where the budget allows more, the guaranteed steps come on top of the budget's
    clock = Clock()
    cheap = budget(0.05, clock=clock)
    cheap.expect_steps(3000)
    measured = simulate(cheap, clock, 3000, lambda s: 1.0, lambda s: 1.0)
    assert set(spread_steps(3000, 8)) <= set(measured) and len(measured) > 100
    # an unknown length (an endless fit) leaves the budget alone
    unknown = budget(0.05)
    unknown.expect_steps(None)
    assert unknown.guaranteed == frozenset()
    unknown.expect_steps(float("inf"))
    assert unknown.guaranteed == frozenset()
