"""The ledger charges the monitor's own time and the slowdown of the steps it disturbs."""

from __future__ import annotations

import pytest

from fisher_monitor.callback.timing import MIN_TYPICAL, Ledger, charged


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_step(ledger: Ledger, clock: FakeClock, seconds: float, monitor: float = 0.0) -> float:
    """One training step of ``seconds`` of training, with ``monitor`` seconds measured in it."""
    ledger.step_started()
    if monitor:
        clock.now += monitor
        ledger.charge(monitor)
        ledger.measured()
    clock.now += seconds
    return ledger.step_finished()


def test_the_two_steps_after_a_measurement_are_charged_their_excess():
    clock = FakeClock()
    ledger = Ledger(clock)
    ledger.start()
    for _ in range(5):
        assert run_step(ledger, clock, 1.0) == 0.0
    # the measured step's own training runs 1.5 s (caches cold), the next one 1.25 s
    assert run_step(ledger, clock, 1.5, monitor=10.0) == pytest.approx(0.5)
    assert run_step(ledger, clock, 1.25) == pytest.approx(0.25)
    assert run_step(ledger, clock, 3.0) == 0.0  # undisturbed: a slow step of its own
    assert ledger.aftermath == pytest.approx(0.75)
    assert ledger.spent == pytest.approx(10.0)  # the caller charges the excess it returns


def test_no_excess_is_charged_before_a_typical_step_is_known():
    clock = FakeClock()
    ledger = Ledger(clock)
    ledger.start()
    for _ in range(MIN_TYPICAL - 1):
        run_step(ledger, clock, 1.0)
    assert run_step(ledger, clock, 5.0, monitor=1.0) == 0.0
    assert ledger.step_finished() == 0.0  # no step running


def test_aftermath_survives_a_checkpoint():
    clock = FakeClock()
    ledger = Ledger(clock)
    ledger.start()
    for _ in range(4):
        run_step(ledger, clock, 1.0)
    ledger.charge(run_step(ledger, clock, 2.0, monitor=1.0))
    state = ledger.state_dict()
    restored = Ledger(clock)
    restored.load_state_dict(state)
    assert restored.aftermath == pytest.approx(1.0) and restored.spent == pytest.approx(2.0)


def test_the_callback_starts_and_finishes_the_ledger_s_step_at_every_batch(monkeypatch):
    """Wired into ``FisherMonitor``: every training batch is started and finished once, so
    the steps a measurement slows down are charged (a second ``on_train_batch_end`` once
    shadowed the one that finished them)."""
    from fisher_monitor import FisherMonitor
    from lightning_helpers import fit

    calls = {"started": 0, "finished": 0}
    started, finished = Ledger.step_started, Ledger.step_finished

    def count_start(self):
        calls["started"] += 1
        return started(self)

    def count_finish(self):
        calls["finished"] += 1
        return finished(self)

    monkeypatch.setattr(Ledger, "step_started", count_start)
    monkeypatch.setattr(Ledger, "step_finished", count_finish)
    fit(FisherMonitor(every_n_steps=2), steps=6)
    assert calls == {"started": 6, "finished": 6}


class _Hooks:
    """A stand-in monitor: a ledger on a fake clock, and ``_charge`` as the monitor's."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self._ledger = Ledger(self.clock)
        self.charges: list[tuple[float, bool]] = []

    def _charge(self, seconds: float, measurement: bool) -> None:
        self._ledger.charge(seconds)
        self.charges.append((seconds, measurement))

    @charged
    def hook(self, bookkeeping: float, measuring: float = 0.0) -> None:
        self.clock.now += bookkeeping
        if measuring:  # a measurement charges itself
            self.clock.now += measuring
            self._charge(measuring, measurement=True)


def test_a_charged_hook_charges_its_own_time_beyond_what_it_charged():
    hooks = _Hooks()
    hooks.hook(0.002)
    assert hooks._ledger.spent == pytest.approx(0.002)
    hooks.hook(0.001, measuring=3.0)
    assert hooks._ledger.spent == pytest.approx(3.003)  # the measurement counted once
    assert hooks.charges[-2:] == [(3.0, True), (pytest.approx(0.001), False)]


def test_a_charged_hook_that_raises_still_charges_its_time():
    hooks = _Hooks()

    @charged
    def failing(self) -> None:
        self.clock.now += 0.5
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        failing(hooks)
    assert hooks._ledger.spent == pytest.approx(0.5)


def test_the_callback_s_per_step_hooks_charge_their_bookkeeping(monkeypatch):
    """A schedule that takes 10 ms to decide, and never measures: the 6 steps' decisions
    are charged (60 ms beyond the same fit with an instant schedule)."""
    import time

    from fisher_monitor import FisherMonitor
    from lightning_helpers import fit

    def slow(step: int) -> bool:
        time.sleep(0.01)
        return False

    spent = {}
    for name, schedule in (("instant", lambda step: False), ("slow", slow)):
        monitor = FisherMonitor(schedule=schedule)
        fit(monitor, steps=6)
        spent[name] = monitor._ledger.spent
    assert spent["slow"] - spent["instant"] >= 0.06 - 0.005


def test_the_hook_calls_counted_are_charged_at_the_dispatch_cost():
    clock = FakeClock()
    ledger = Ledger(clock)
    ledger.dispatch = 2e-6
    for _ in range(6):
        ledger.dispatched()
    assert ledger.take_dispatch() == pytest.approx(12e-6)
    assert ledger.take_dispatch() == 0.0  # charged once


def test_dispatch_seconds_times_a_hook_call_as_lightning_makes_it():
    """A hook call that takes 1 ms of the fake clock: the dispatch measured is 1 ms, so the
    measurement times the call itself, not a constant."""
    from fisher_monitor.callback.timing import DISPATCH_CALLS, DISPATCH_ROUNDS, dispatch_seconds

    clock = FakeClock()

    class Probed:
        state_key = "Probed"
        calls = 0

        def _dispatch_probe(self, trainer, module) -> None:
            Probed.calls += 1
            clock.now += 1e-3

    assert dispatch_seconds(Probed(), object(), clock) == pytest.approx(1e-3)
    assert Probed.calls == DISPATCH_CALLS * DISPATCH_ROUNDS


def test_lightning_s_dispatch_of_every_step_s_hooks_is_charged(monkeypatch):
    """Six hook calls per automatic-optimization step, each charged at the dispatch cost
    measured at the start of the fit (a real one: positive, and well below a millisecond)."""
    from fisher_monitor import FisherMonitor
    from lightning_helpers import fit

    taken = []
    take = Ledger.take_dispatch

    def count(self):
        calls = self._dispatched
        seconds = take(self)
        taken.append((calls, seconds, self.dispatch))
        return seconds

    monkeypatch.setattr(Ledger, "take_dispatch", count)
    fit(FisherMonitor(schedule=lambda step: False), steps=5)
    assert [calls for calls, _, _ in taken] == [6] * 5
    dispatch = taken[0][2]
    assert 0 < dispatch < 1e-3
    assert all(seconds == pytest.approx(6 * dispatch) for _, seconds, _ in taken)
