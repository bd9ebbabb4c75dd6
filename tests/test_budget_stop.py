"""BudgetStop and its ledger: simulated days, concurrency, crashes, cost, time zones, bad input."""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
import zoneinfo

import forkserver
import keras
import numpy as np
import pytest
from conftest import BACKEND, make_data, make_model, needs_steps_per_execution
from keras.src.utils import python_utils

import keras_ckpt
from keras_ckpt.ledger import DayClock, Ledger, LedgerError

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


def at(*args) -> float:
    """POSIX time of a Berlin wall-clock time."""
    return datetime.datetime(*args, tzinfo=BERLIN).timestamp()


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Tick(keras.callbacks.Callback):
    """Each training step takes `seconds` of fake time (put it before BudgetStop).

    Replays of already-trained steps after a mid-epoch resume take no time.
    """

    def __init__(self, clock, seconds=60.0):
        super().__init__()
        self.clock, self.seconds, self.last = clock, seconds, None

    def on_train_batch_end(self, batch, logs=None):
        done = int(self.model.optimizer.iterations.numpy())
        if done != self.last:
            self.clock.t += self.seconds
            self.last = done


X, Y = make_data(48, seed=5)  # 6 steps of 8 per epoch


def run(tmp_path, clock, epochs=25, checkpoint=True, **budget_kwargs):
    """One 'script run': fresh model, resume from the directory, budget on the shared ledger."""
    model = make_model(seed=0)
    budget_kwargs.setdefault("ledger", str(tmp_path / "ledger.json"))
    budget_kwargs.setdefault("timezone", "Europe/Berlin")
    budget = keras_ckpt.BudgetStop(clock=clock, verbose=0, **budget_kwargs)
    callbacks = [Tick(clock)]
    if checkpoint:
        callbacks.append(keras_ckpt.ModelCheckpoint(str(tmp_path / "ckpt" / "e{epoch:02d}.keras"),
                                                    resume=True))
    callbacks.append(budget)
    history = model.fit(X, Y, batch_size=8, epochs=epochs, verbose=0, shuffle=False,
                        callbacks=callbacks)
    return model, budget, history


def steps(model):
    return int(model.optimizer.iterations.numpy())


def test_five_runs_over_three_days_on_a_one_hour_budget(tmp_path):
    clock = FakeClock(at(2026, 11, 22, 8, 0))
    hour = 3600.0
    starts = [at(2026, 11, 22, 8), at(2026, 11, 22, 14), at(2026, 11, 23, 8),
              at(2026, 11, 24, 8), at(2026, 11, 24, 20)]
    trained = []
    for start in starts:
        clock.t = start
        model, budget, history = run(tmp_path, clock, daily_budget=hour)
        trained.append(steps(model))
    ledger = Ledger(tmp_path / "ledger.json", DayClock("Europe/Berlin"))
    for day in ("2026-11-22", "2026-11-23", "2026-11-24"):
        assert 0 < ledger.used_on(day)[0] <= hour
    assert hour - 61 <= ledger.used_on("2026-11-22")[0]  # within one step of the budget
    assert trained[-1] == 150  # the last run found the job complete
    reasons = [s["stop_reason"] for s in ledger.sessions()]
    assert reasons[:4] == ["daily-budget", "budget-spent-at-start", "daily-budget", None]
    assert len(ledger.sessions()) == 5
    # The same 25 epochs as one uninterrupted run, and the same weights.
    straight = make_model(seed=0)
    straight.fit(X, Y, batch_size=8, epochs=25, verbose=0, shuffle=False)
    assert steps(model) == steps(straight) == 150
    for a, b in zip(model.variables, straight.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert len(history.history["loss"]) == 25


def test_budget_spent_at_start_trains_nothing_and_says_so(tmp_path, capsys):
    clock = FakeClock(at(2026, 11, 22, 9))
    run(tmp_path, clock, daily_budget=630)  # 10 steps of 60 s; 30 s left: less than a step
    capsys.readouterr()
    clock.t = at(2026, 11, 22, 12)
    model, budget, history = run(tmp_path, clock, daily_budget=630, checkpoint=False)
    out = capsys.readouterr().out
    assert steps(model) == 0 and budget.stop_reason == "budget-spent-at-start"
    assert "used 10m of 10m for 2026-11-22 (Europe/Berlin)" in out
    assert "next window opens 2026-11-23 00:00" in out
    with pytest.raises(keras_ckpt.BudgetExhaustedError, match="no step was trained"):
        run(tmp_path, clock, daily_budget=630, checkpoint=False, raise_if_exhausted=True)


def test_stop_message_and_reason(tmp_path, capsys):
    clock = FakeClock(at(2026, 11, 22, 9))
    model = make_model(seed=0)
    budget = keras_ckpt.BudgetStop(daily_budget=3600, timezone="Europe/Berlin", clock=clock,
                                   ledger=str(tmp_path / "l.json"))
    checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "c" / "e{epoch}.keras"))
    model.fit(X, Y, batch_size=8, epochs=30, verbose=0,
              callbacks=[Tick(clock), checkpoint, budget])
    out = capsys.readouterr().out
    assert "BudgetStop: used 59m of 1h00m for 2026-11-22 (Europe/Berlin); stopped after " \
           "epoch 10, step 5 (daily-budget); checkpoint" in out
    assert "next window opens 2026-11-23 00:00" in out
    assert budget.stop_reason == "daily-budget" and budget.stopped_at == (9, 5)
    info = keras_ckpt.list_checkpoints(tmp_path / "c")[-1]
    assert (info.epoch, info.step, info.epoch_complete) == (9, 5, False)
    assert budget.session["checkpoint"] == info.path


def test_a_budget_stop_mid_epoch_is_not_an_epoch_end_for_early_stopping(tmp_path):
    clock = FakeClock(at(2026, 11, 22, 9))
    model = make_model(seed=0)
    stop = keras_ckpt.EarlyStopping(monitor="loss", patience=0, min_delta=100.0)
    budget = keras_ckpt.BudgetStop(max_duration=8 * 60 + 30, clock=clock, verbose=0,
                                   ledger=str(tmp_path / "l"))
    checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "c" / "e{epoch}.keras"))
    model.fit(X, Y, batch_size=8, epochs=5, verbose=0,
              callbacks=[Tick(clock), checkpoint, stop, budget])
    assert budget.stopped_at == (1, 2)
    # Epoch 2 was cut short by the budget: EarlyStopping did not judge it (it would have
    # stopped: nothing beats min_delta=100), and no epoch-complete checkpoint claims it.
    assert stop.stop_reason is None and stop.wait == 0
    info = keras_ckpt.list_checkpoints(tmp_path / "c")[-1]
    assert (info.epoch, info.step, info.epoch_complete) == (1, 2, False)


def test_run_time_limit_with_validation_and_save_time_in_the_projection(tmp_path):
    clock = FakeClock(at(2026, 11, 22, 9))

    class SlowValidation(keras.callbacks.Callback):
        def on_test_end(self, logs=None):
            clock.t += 120.0

    model = make_model(seed=0)
    budget = keras_ckpt.BudgetStop(max_duration=1800, clock=clock, ledger=str(tmp_path / "l"),
                                   verbose=0)
    model.fit(X, Y, batch_size=8, epochs=30, verbose=0, validation_data=(X[:8], Y[:8]),
              callbacks=[Tick(clock), SlowValidation(), budget])
    used = budget.session["seconds"]
    assert used <= 1800 and budget.stop_reason == "max-duration"
    assert used > 1800 - 60 - 120 - 1  # stopped at the last step that still fit


@pytest.mark.parametrize("kwargs, reason, minutes", [
    ({"price_per_hour": 2.0, "devices": 4, "daily_cost_limit": 4.0}, "daily-cost-limit", 30),
    ({"price_per_hour": 2.0, "devices": 4, "run_cost_limit": 1.0}, "run-cost-limit", 7.5),
    ({"price_per_hour": 2.0, "daily_cost_limit": 100.0, "daily_budget": 1200}, "daily-budget",
     20),
])
def test_cost_limits(tmp_path, kwargs, reason, minutes):
    clock = FakeClock(at(2026, 11, 22, 9))
    model, budget, _ = run(tmp_path, clock, checkpoint=False, **kwargs)
    assert budget.stop_reason == reason
    assert minutes * 60 - 61 <= budget.session["seconds"] <= minutes * 60
    assert budget.session["cost"] == pytest.approx(
        budget.session["seconds"] * kwargs["price_per_hour"] * kwargs.get("devices", 1) / 3600)


def test_a_run_crossing_midnight_charges_both_days(tmp_path):
    clock = FakeClock(at(2026, 11, 22, 23, 30))
    model, budget, _ = run(tmp_path, clock, daily_budget=3600, checkpoint=False)
    ledger = Ledger(tmp_path / "ledger.json", DayClock("Europe/Berlin"))
    assert ledger.used_on("2026-11-22")[0] == pytest.approx(1800)
    assert ledger.used_on("2026-11-23")[0] == pytest.approx(3600)  # no checkpoint to save
    assert steps(model) == 90


def test_day_boundaries_follow_the_time_zone_across_dst(tmp_path):
    days = DayClock("Europe/Berlin", reset_hour=0)
    spring = days.start(datetime.date(2026, 3, 30)) - days.start(datetime.date(2026, 3, 29))
    autumn = days.start(datetime.date(2026, 10, 26)) - days.start(datetime.date(2026, 10, 25))
    assert (spring, autumn) == (23 * 3600, 25 * 3600)
    shifted = DayClock("Europe/Berlin", reset_hour=6)
    assert shifted.day(at(2026, 11, 22, 5, 59)).isoformat() == "2026-11-21"
    assert shifted.day(at(2026, 11, 22, 6, 0)).isoformat() == "2026-11-22"
    # A run through the spring-forward night: charges add up to the real time spent.
    clock = FakeClock(at(2026, 3, 28, 23, 0))
    model, budget, _ = run(tmp_path, clock, daily_budget=2 * 3600, checkpoint=False)
    ledger = Ledger(tmp_path / "ledger.json", days)
    first, second = ledger.used_on("2026-03-28")[0], ledger.used_on("2026-03-29")[0]
    assert first == pytest.approx(3600) and second <= 2 * 3600
    assert first + second == pytest.approx(budget.session["seconds"])


def test_per_batch_work_keeps_async_dispatch():
    budget = keras_ckpt.BudgetStop(max_duration=10, ledger="unused.json")
    assert budget.async_safe and not python_utils.is_default(budget.on_train_batch_end)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"max_duration": 0}, ValueError, "`max_duration` must be > 0"),
    ({"daily_budget": -5}, ValueError, "`daily_budget` must be > 0"),
    ({"daily_budget": datetime.timedelta(0)}, ValueError, "`daily_budget` must be > 0"),
    ({"daily_budget": 60, "timezone": "Mars/Olympus"}, ValueError, "not a known IANA"),
    ({"daily_budget": 60, "reset_hour": 24}, ValueError, "`reset_hour`"),
    ({"daily_cost_limit": 5.0}, ValueError, "needs `price_per_hour`"),
    ({}, ValueError, "needs a limit"),
    ({"max_duration": 5, "devices": 0}, ValueError, "`devices` must be >= 1"),
    ({"max_duration": 5, "sync_interval": 0}, ValueError, "`sync_interval` must be > 0"),
])
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        keras_ckpt.BudgetStop(**kwargs)


def test_corrupt_ledger_is_reported_and_never_reset(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text('{"format": "keras-ckpt-ledger", "days": {"2026-11-22": ')
    before = path.read_bytes()
    model = make_model()
    budget = keras_ckpt.BudgetStop(daily_budget=60, ledger=str(path))
    with pytest.raises(LedgerError, match="not valid JSON.*never resets"):
        model.fit(X, Y, epochs=1, verbose=0, callbacks=[budget])
    assert path.read_bytes() == before and steps(model) == 0
    path.write_text('{"something": "else"}')
    with pytest.raises(LedgerError, match="not a keras-ckpt budget ledger"):
        model.fit(X, Y, epochs=1, verbose=0, callbacks=[budget])


def test_time_past_the_reservation_is_charged_within_budget_then_overrun(tmp_path):
    days = DayClock("UTC")
    ledger = Ledger(tmp_path / "l.json", days)
    t = at(2026, 11, 22, 9)
    a = ledger.begin(t, {})
    b = ledger.begin(t, {})
    assert ledger.reserve(a, t, t + 50, 60, None) == t + 50
    assert ledger.reserve(b, t, t + 50, 60, None) == t + 10  # only 10 s left for b
    # b's step ran 25 s past its reservation: nothing left to charge it to.
    record = ledger.end(b, t + 35, "daily-budget", None, limits=(60, None))
    assert record["seconds"] == pytest.approx(10) and record["overrun"] == pytest.approx(25)
    record = ledger.end(a, t + 40, None, None, limits=(60, None))  # a ends early: refund
    assert record["seconds"] == pytest.approx(40)
    assert ledger.used_on("2026-11-22")[0] == pytest.approx(50)


def test_budget_cli(tmp_path, capsys):
    clock = FakeClock(at(2026, 11, 22, 9))
    run(tmp_path, clock, daily_budget=1800, checkpoint=False)
    from keras_ckpt.cli import main

    ledger = str(tmp_path / "ledger.json")
    capsys.readouterr()
    assert main(["budget", ledger, "--now", str(at(2026, 11, 22, 12))]) == 0
    out = capsys.readouterr().out
    # One unit on every line: H:MM:SS.
    assert "2026-11-22 (Europe/Berlin): used 0:30:00 of 0:30:00, 0:00:00 left" in out
    assert "next window opens 2026-11-23 00:00" in out and "daily-budget" in out
    assert re.search(r"2026-11-22 09:00  09:30 +0:30:00 ", out), out
    # --now in ISO 8601: in the ledger's time zone, or with an offset.
    assert main(["budget", ledger, "--now", "2026-11-22T12:00"]) == 0
    assert capsys.readouterr().out == out
    assert main(["budget", ledger, "--now", "2026-11-22T11:00+00:00"]) == 0
    assert capsys.readouterr().out == out
    assert main(["budget", ledger, "--now", "noon"]) == 2
    assert "neither POSIX seconds nor an ISO 8601 time" in capsys.readouterr().out
    assert main(["budget", ledger, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["daily_seconds"] == 1800
    assert main(["budget", str(tmp_path / "missing.json")]) == 1


def test_a_session_ended_by_early_stopping_says_so_in_the_ledger(tmp_path, capsys):
    clock = FakeClock(at(2026, 11, 22, 9))
    model = make_model(seed=0)
    ledger = str(tmp_path / "ledger.json")
    stop = keras_ckpt.EarlyStopping("loss", patience=0, min_delta=100.0)
    model.fit(X, Y, batch_size=8, epochs=5, verbose=0, shuffle=False, callbacks=[
        Tick(clock), stop, keras_ckpt.BudgetStop(max_duration=3600, ledger=ledger, clock=clock,
                                                 timezone="Europe/Berlin", verbose=0)])
    from keras_ckpt.cli import main

    capsys.readouterr()
    assert main(["budget", ledger, "--now", str(at(2026, 11, 22, 12))]) == 0
    out = capsys.readouterr().out
    assert "(no daily time limit)" in out and "early-stopping" in out


# ------------------------------------------------------------------ real processes, real time
def child(tmp_path, name, *args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, "-m", "keras_ckpt.demo_train", str(tmp_path / name),
               str(tmp_path / f"{name}.npz"), "--ledger", str(tmp_path / "ledger.json"), *args]
    return forkserver.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


@pytest.mark.slow
@pytest.mark.realtime
def test_two_processes_on_one_ledger_never_overspend(tmp_path):
    budget = 4.0
    procs = [child(tmp_path, name, "--daily-budget", str(budget), "--epochs", "100000",
                   "--sync-interval", "0.3") for name in ("a", "b")]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    ledger = Ledger(tmp_path / "ledger.json", DayClock("UTC"))
    sessions = ledger.sessions()
    assert len(sessions) == 2 and all(s["stop_reason"] == "daily-budget" for s in sessions)
    total = sum(s["seconds"] for s in sessions)
    assert total <= budget + 1e-6
    days = json.loads((tmp_path / "ledger.json").read_text())["days"].values()
    charged = sum(d["seconds"] for d in days)
    assert charged <= budget + 1e-6 and charged == pytest.approx(total)
    # A step slower than projected is not hidden: it is overrun, at most about a step each.
    overrun = sum(s.get("overrun", 0.0) for s in sessions)
    assert overrun == pytest.approx(sum(d.get("overrun", 0.0) for d in days))
    assert overrun < 2.0


@pytest.mark.slow
@pytest.mark.realtime
def test_a_killed_run_stays_charged_and_the_next_run_sees_it(tmp_path):
    started = time.time()
    proc = child(tmp_path, "k", "--daily-budget", "1000", "--epochs", "100000",
                 "--sync-interval", "0.3", "--kill-step", "60")
    proc.communicate(timeout=300)
    lifetime = time.time() - started
    assert proc.returncode == -signal.SIGKILL
    ledger = Ledger(tmp_path / "ledger.json", DayClock("UTC"))
    (killed,) = ledger.sessions()
    assert killed["end"] is None and 0 < killed["seconds"] < lifetime + 0.3 + 1.0
    today = DayClock("UTC").day(time.time()).isoformat()
    assert ledger.used_on(today)[0] == pytest.approx(killed["seconds"])
    # The next run counts it against the budget.
    model = make_model()
    budget = keras_ckpt.BudgetStop(daily_budget=killed["seconds"], ledger=str(
        tmp_path / "ledger.json"), verbose=0)
    model.fit(X, Y, epochs=3, verbose=0, callbacks=[budget])
    assert budget.stop_reason == "budget-spent-at-start" and steps(model) == 0


@pytest.mark.realtime
@pytest.mark.backends
def test_real_time_run_stops_within_one_step_of_the_limit(tmp_path):
    class StepTimes(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.longest = max(getattr(self, "longest", 0.0), time.perf_counter() - self.t0)

    limit = 2.0
    times = StepTimes()
    model = make_model()
    checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "c" / "e{epoch}.keras"))
    budget = keras_ckpt.BudgetStop(max_duration=limit, ledger=str(tmp_path / "l.json"),
                                   verbose=0)
    x, y = make_data(2000, seed=1)
    model.fit(x, y, batch_size=8, epochs=10_000, verbose=0, callbacks=[times, checkpoint, budget])
    used = budget.session["seconds"]
    assert budget.stop_reason == "max-duration"
    assert used <= limit + times.longest + 0.25  # one step of slack (the final save included)
    info, _ = keras_ckpt.latest_checkpoint(tmp_path / "c")
    assert info.path == budget.checkpoint


class TickPerStep(Tick):
    """Like Tick, but counts every step of an execution (steps_per_execution > 1)."""

    def on_train_batch_end(self, batch, logs=None):
        done = int(self.model.optimizer.iterations.numpy())
        self.clock.t += self.seconds * (done - (self.last or 0))
        self.last = done


def spe_budget_run(tmp_path, **checkpoint_kwargs):
    """25 epochs of 6 steps, in executions of 4, on a 29-minute daily budget at 60 s a step."""
    clock = FakeClock(at(2026, 3, 2, 9, 0))
    model = make_model(seed=0)
    model.compile(optimizer="adam", loss="mse", steps_per_execution=4)
    budget = keras_ckpt.BudgetStop(daily_budget=29 * 60, clock=clock, verbose=0,
                                   ledger=str(tmp_path / "ledger.json"), timezone="Europe/Berlin")
    checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "ckpt" / "e{epoch:02d}.keras"),
                                            **checkpoint_kwargs)
    model.fit(X, Y, batch_size=8, epochs=25, verbose=0, shuffle=False,
              callbacks=[TickPerStep(clock), checkpoint, budget])
    return model, budget


@needs_steps_per_execution
@pytest.mark.backends
def test_with_steps_per_execution_the_stop_overshoots_by_at_most_one_execution(tmp_path):
    model, budget = spe_budget_run(tmp_path, resume=True)
    trained = int(model.optimizer.iterations.numpy())
    assert budget.stop_reason == "daily-budget"
    # 60 s a step, 29 min: the stop lands within one execution (4 steps) of the budget
    assert 29 - 4 <= trained <= 29 + 4
    used, _ = Ledger(tmp_path / "ledger.json", DayClock("Europe/Berlin")).used_on("2026-03-02")
    assert used <= 29 * 60
    newest = keras_ckpt.list_checkpoints(tmp_path / "ckpt")[-1]
    # At an execution boundary: an epoch's 6 steps run as executions of 4 and
    # of 2, so the stop is 4 steps into an epoch or at its end; the newest
    # checkpoint is the one BudgetStop made there, and says where that is.
    steps_per_epoch = len(X) // 8
    assert steps_per_epoch == 6 and trained % steps_per_epoch in (0, 4)
    epoch = (trained - 1) // steps_per_epoch
    step = trained - epoch * steps_per_epoch
    assert newest.path == budget.checkpoint
    assert (newest.global_step, newest.epoch, newest.step) == (trained, epoch, step)
    # Mid-epoch it is not a finished epoch. At the epoch's last step, TensorFlow's
    # fit runs the epoch's end before the stop's save, JAX's saves first.
    at_end = {"tensorflow": True, "jax": False}[BACKEND]
    assert newest.epoch_complete is (step == steps_per_epoch and at_end)
    # and a resume from it goes on to the same end as a run that was never stopped
    resumed = make_model(seed=5)
    resumed.compile(optimizer="adam", loss="mse", steps_per_execution=4)
    resumed.fit(X, Y, batch_size=8, epochs=25, verbose=0, shuffle=False, callbacks=[
        keras_ckpt.ModelCheckpoint(str(tmp_path / "ckpt" / "e{epoch:02d}.keras"), resume=True)])
    straight = make_model(seed=0)
    straight.compile(optimizer="adam", loss="mse", steps_per_execution=4)
    straight.fit(X, Y, batch_size=8, epochs=25, verbose=0, shuffle=False)
    for a, b in zip(straight.variables, resumed.variables, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@needs_steps_per_execution
def test_with_steps_per_execution_stopped_at_is_where_the_checkpoint_is(tmp_path):
    _, budget = spe_budget_run(tmp_path)
    newest = keras_ckpt.list_checkpoints(tmp_path / "ckpt")[-1]
    assert newest.path == budget.checkpoint
    assert budget.stopped_at == (newest.epoch, newest.step)
