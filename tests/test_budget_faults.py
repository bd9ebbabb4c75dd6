"""Budgets that survive any clock and any ledger file.

BudgetStop charges a monotonic clock: the wall clock is read once a fit, to
place the run in its budget days, and its jumps neither refund nor charge time
(each test injects both clocks: the wall clock jumps, the monotonic one only
advances with the steps trained). A ledger whose contents are not what
keras-ckpt writes is one `LedgerError`, before anything is written to it.
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


# ------------------------------------------------------------------ the ledger's contents
def ledger_with(**changes) -> dict:
    data = {"format": "keras-ckpt-ledger", "version": 1, "config": {},
            "days": {"2026-11-22": {"seconds": 10.0, "cost": 0.0}},
            "sessions": [{"id": "a", "start": 1.0, "paid_until": 11.0, "end": 11.0,
                          "seconds": 10.0, "cost": 0.0}]}
    data.update(changes)
    return data


MALFORMED = {
    "days-list": ledger_with(days=[]),
    "day-not-a-date": ledger_with(days={"yesterday": {"seconds": 1.0, "cost": 0.0}}),
    "seconds-text": ledger_with(days={"2026-11-22": {"seconds": "10", "cost": 0.0}}),
    "seconds-negative": ledger_with(days={"2026-11-22": {"seconds": -1e9, "cost": 0.0}}),
    "day-a-number": ledger_with(days={"2026-11-22": 5}),
    "sessions-dict": ledger_with(sessions={}),
    "session-a-string": ledger_with(sessions=["a"]),
    "session-without-id": ledger_with(sessions=[{"start": 1.0, "paid_until": 2.0}]),
    "session-start-text": ledger_with(sessions=[{"id": "a", "start": "x", "paid_until": 2.0}]),
    "config-list": ledger_with(config=[]),
    "reset-hour-text": ledger_with(config={"reset_hour": "9"}),
    "version-text": ledger_with(version="1"),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_ledger_is_one_error_and_is_left_untouched(tmp_path, data, capsys):
    import json

    from keras_ckpt.cli import run_budget
    from keras_ckpt.ledger import LedgerError

    path = tmp_path / "ledger.json"
    path.write_text(json.dumps(data))
    before = path.read_bytes()
    model = make_model()
    budget = keras_ckpt.BudgetStop(daily_budget=600, ledger=str(path), verbose=0)
    with pytest.raises(LedgerError, match="ledger.json"):
        model.fit(X, Y, epochs=1, verbose=0, callbacks=[budget])
    assert path.read_bytes() == before and steps(model) == 0  # no session opened in it
    assert run_budget(str(path)) == 3  # (2 is argparse's: wrong arguments)
    assert "ledger.json" in capsys.readouterr().out


def test_a_binary_ledger_is_one_error(tmp_path, capsys):
    from keras_ckpt.cli import run_budget
    from keras_ckpt.ledger import LedgerError

    path = tmp_path / "ledger.json"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(LedgerError, match="not text"):
        Ledger(path, DayClock())
    assert run_budget(str(path)) == 3 and "not text" in capsys.readouterr().out
