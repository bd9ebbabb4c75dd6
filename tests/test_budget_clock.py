"""BudgetStop charges a monotonic clock: wall-clock jumps neither refund nor charge time.

The wall clock is read once a fit, to place the run in its budget days; every
charge after that is monotonic time. Each test injects both clocks: the wall
clock jumps, the monotonic one only advances with the steps trained.
"""

from __future__ import annotations

import keras
import pytest
from conftest import make_model
from test_budget_stop import FakeClock, X, Y, at, steps

import keras_ckpt
from keras_ckpt.clocks import SteadyClock
from keras_ckpt.ledger import DayClock, Ledger


class Jumpy(keras.callbacks.Callback):
    """Each trained step takes `seconds` on both clocks; after global step `at_step`
    the wall clock alone jumps by `jump` (put it before BudgetStop)."""

    def __init__(self, wall, mono, at_step, jump, seconds=60.0):
        super().__init__()
        self.wall, self.mono, self.at_step, self.jump = wall, mono, at_step, jump
        self.seconds, self.last = seconds, None

    def on_train_batch_end(self, batch, logs=None):
        done = steps(self.model)
        if done != self.last:
            self.wall.t += self.seconds
            self.mono.t += self.seconds
            self.last = done
            if done == self.at_step:
                self.wall.t += self.jump


def run(directory, start, jump, at_step, **budget_kwargs):
    wall, mono = FakeClock(start), FakeClock(5_000.0)
    model = make_model(seed=0)
    ledger = directory / "ledger.json"
    budget = keras_ckpt.BudgetStop(clock=wall, monotonic_clock=mono, verbose=0,
                                   ledger=str(ledger), timezone="Europe/Berlin",
                                   **budget_kwargs)
    model.fit(X, Y, batch_size=8, epochs=40, verbose=0, shuffle=False,
              callbacks=[Jumpy(wall, mono, at_step, jump), budget])
    return steps(model), budget, Ledger(ledger, DayClock("Europe/Berlin"))


@pytest.mark.parametrize("jump", [-3600.0, 3600.0], ids=["back-1h", "forward-1h"])
def test_a_wall_clock_jump_mid_run_neither_refunds_nor_charges(tmp_path, jump):
    trained, budget, ledger = run(tmp_path, at(2026, 11, 22, 9), jump, 5, daily_budget=1800)
    assert trained == 30  # 1800 s of 60 s steps, as without the jump
    assert ledger.used_on("2026-11-22")[0] == pytest.approx(1800)
    assert sum(s for s, _ in (ledger.used_on(d) for d in ledger.summary(0)["days"])) == \
        pytest.approx(1800)
    assert budget.stop_reason == "daily-budget" and budget.session["end"] is not None
    assert budget.session["seconds"] == pytest.approx(1800)


def test_a_wall_clock_stepped_back_across_midnight_still_closes_the_session(tmp_path):
    # 23:50: 10 steps on the 22nd; at 00:05 the clock steps back to 23:05.
    trained, budget, ledger = run(tmp_path, at(2026, 11, 22, 23, 50), -3600.0, 15,
                                  daily_budget=3600)
    assert ledger.used_on("2026-11-22")[0] == pytest.approx(600)
    assert ledger.used_on("2026-11-23")[0] == pytest.approx(3600)
    assert trained == 70
    assert budget.session["end"] is not None and budget.stop_reason == "daily-budget"


def test_the_steady_clock_starts_at_the_wall_and_never_goes_back():
    wall, mono = FakeClock(1_000_000.0), FakeClock(7.0)
    clock = SteadyClock(wall, mono)
    clock.start()
    wall.t, mono.t = 0.0, 9.0  # the wall clock jumps far back; 2 s pass
    assert clock() == 1_000_002.0
    mono.t = 8.0  # a monotonic clock never does this; the time still does not go back
    assert clock() == 1_000_002.0
    only_wall = SteadyClock(wall)  # one fake clock: it is both
    only_wall.start()
    wall.t += 30.0
    assert only_wall() == only_wall.started_at + 30.0
