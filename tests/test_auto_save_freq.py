"""`save_freq="auto"`: the interval follows the measured cost of a save and of a step.

Time comes from an injected clock: a callback ahead of ModelCheckpoint moves it
by a step's time after every batch, and a retention policy (called inside each
save, on the training thread) moves it by a save's cost.
"""

from __future__ import annotations

import json
import math
import os
import re

import keras
import pytest
from conftest import make_data, make_model

import keras_ckpt
from keras_ckpt.callbacks.model_checkpoint.auto_freq import AutoFrequency
from keras_ckpt.inspect import run_inspect

STEP, COST, OVERHEAD = 0.01, 0.01, 0.02
EVERY = math.ceil(COST * (1 - OVERHEAD) / (OVERHEAD * STEP))  # 49 steps


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.blocked = 0.0

    def __call__(self) -> float:
        return self.now


class Steps(keras.callbacks.Callback):
    """Each training step takes `STEP` seconds on the clock."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock

    def on_train_batch_end(self, batch, logs=None):
        self.clock.now += STEP


class SaveCosts:
    """A retention policy keeping everything; each save takes `COST` on the clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def keep(self, checkpoints):
        self.clock.now += COST
        self.clock.blocked += COST
        return {c.path for c in checkpoints}


def drive(policy: AutoFrequency, clock: Clock, steps: int, step: float, cost: float) -> list:
    """Trains `steps` steps under `policy` on `clock`; returns the steps saved at."""
    saved, last_step, last_time = [], 0, clock.now
    for global_step in range(1, steps + 1):
        clock.now += step
        policy.observe_step(global_step)
        if policy.due(global_step, last_step, last_time):
            started = clock.now  # ModelCheckpoint counts from a save's start
            clock.now += cost
            clock.blocked += cost
            last_step, last_time = global_step, started
            policy.observe_save(clock.now - started)
            saved.append(global_step)
    return saved


def test_the_interval_makes_saving_cost_the_target_share():
    clock = Clock()
    policy = AutoFrequency(overhead=0.02, max_lost=3600, clock=clock)
    saved = drive(policy, clock, steps=20_000, step=0.1, cost=0.2)
    every = math.ceil(0.2 * 0.98 / (0.02 * 0.1))  # 98
    assert saved[0] == 4  # once two steps are measured: a save, to measure it
    assert {b - a for a, b in zip(saved, saved[1:], strict=False)} == {every}
    share = clock.blocked / clock.now
    assert 0.9 * 0.02 <= share <= 1.1 * 0.02, share
    report = policy.report()
    assert report["every_steps"] == every and report["step_seconds"] == pytest.approx(0.1)
    assert report["save_seconds"] == pytest.approx(0.2)


def test_the_bound_on_lost_training_wins_over_the_share():
    clock = Clock()
    policy = AutoFrequency(overhead=0.02, max_lost=5.0, clock=clock)
    saved = drive(policy, clock, steps=2_000, step=0.1, cost=0.2)
    # A kill just before a save loses the steps since the last saved one and that save.
    assert {b - a for a, b in zip(saved, saved[1:], strict=False)} == {48}
    assert policy.report()["lost_at_most_seconds"] == pytest.approx(5.0)


def test_a_first_expensive_save_does_not_set_the_interval_for_long():
    clock = Clock()
    policy = AutoFrequency(overhead=0.02, max_lost=3600, clock=clock)
    costs = iter([2.0] + [0.2] * 100)  # a process's first save builds caches
    saved, last_step, last_time = [], 0, 0.0
    for global_step in range(1, 3_000):
        clock.now += 0.1
        policy.observe_step(global_step)
        if policy.due(global_step, last_step, last_time):
            cost = next(costs)
            last_step, last_time = global_step, clock.now
            clock.now += cost
            policy.observe_save(cost)
            saved.append(global_step)
    gaps = [b - a for a, b in zip(saved, saved[1:], strict=False)]
    assert gaps[0] == math.ceil(2.0 * 0.98 / (0.02 * 0.1))  # 980, from one measurement
    assert gaps[-1] == 98  # the median of the recent saves: the usual cost


def test_the_step_time_leaves_out_tracing_epoch_ends_and_the_saves():
    clock = Clock()
    policy = AutoFrequency(overhead=0.02, max_lost=3600, clock=clock)
    clock.now = 7.0  # the first step traced
    policy.observe_step(1)
    clock.now += 3.0  # a second compile
    policy.observe_step(2)
    for step in range(3, 8):
        clock.now += 0.1
        policy.observe_step(step)
    clock.now += 5.0  # a save
    policy.observe_save(5.0)
    clock.now += 0.1
    policy.observe_step(8)
    clock.now += 30.0  # validation and a new epoch
    policy.epoch_begin()
    clock.now += 0.1
    policy.observe_step(9)
    clock.now += 0.1
    policy.observe_step(10)
    assert policy.step_seconds == pytest.approx(0.1)


def fit_auto(tmp_path, clock, epochs, callback=None, verbose=0, **kw):
    callback = callback or keras_ckpt.ModelCheckpoint(
        str(tmp_path / "a-{epoch}-{batch}.keras"), save_freq="auto", clock=clock,
        retention=[SaveCosts(clock)], verbose=verbose, **kw)
    x, y = make_data(512)
    model = make_model()
    model.fit(x, y, batch_size=4, epochs=epochs, callbacks=[Steps(clock), callback], verbose=0)
    return model, callback


def saved_steps(tmp_path) -> list[int]:
    """The global steps of the checkpoints (128 steps an epoch)."""
    return sorted(c.epoch * 128 + c.step for c in keras_ckpt.list_checkpoints(tmp_path))


def test_a_fit_saves_at_the_chosen_interval_and_says_so(tmp_path, capsys):
    clock = Clock()
    _, cb = fit_auto(tmp_path, clock, epochs=2, verbose=1)  # 128 steps an epoch
    assert saved_steps(tmp_path) == [4] + list(range(4 + EVERY, 256 + 1, EVERY))
    share = clock.blocked / clock.now
    assert 0.5 * OVERHEAD <= share <= 1.5 * OVERHEAD, share
    said = capsys.readouterr().out
    assert f"save_freq='auto': a save every {EVERY} steps (a save blocks 10 ms, " \
           "a step takes 10 ms: 2.0% of training time, target 2.0%" in said
    assert said.count("save_freq='auto'") == 1  # said again only when the interval moves
    assert cb.get_config()["save_freq"] == "auto"


def test_inspect_reports_what_auto_chose(tmp_path, capsys):
    fit_auto(tmp_path, Clock(), epochs=1)
    capsys.readouterr()
    assert run_inspect(str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert re.search(rf"save_freq='auto' \(newest checkpoint\): a save every {EVERY} steps; "
                     r"a save blocks 0\.01 s, a step takes 0\.01 s: 2\.0% of training time "
                     r"\(target 2\.0%\)", out), out
    assert run_inspect(str(tmp_path), as_json=True) == 0
    rows = json.loads(capsys.readouterr().out)
    chosen = [r["save_freq_auto"] for r in rows if r["save_freq_auto"]]
    assert len(chosen) == 1 and rows[-1]["latest"] and chosen[0]["every_steps"] == EVERY


def test_a_resumed_fit_starts_from_the_saved_estimates(tmp_path):
    clock = Clock()
    fit_auto(tmp_path, clock, epochs=2)
    before = saved_steps(tmp_path)
    resumed = keras_ckpt.ModelCheckpoint(
        str(tmp_path / "a-{epoch}-{batch}.keras"), save_freq="auto", clock=clock,
        retention=[SaveCosts(clock)], resume=True)
    fit_auto(tmp_path, clock, epochs=3, callback=resumed)
    new = [s for s in saved_steps(tmp_path) if s not in before]
    # No measuring save a few steps in: the interval holds from the first step.
    assert new == list(range(before[-1] + EVERY, 384 + 1, EVERY))


def test_save_interval_bounds_what_a_kill_loses(tmp_path):
    clock = Clock()
    fit_auto(tmp_path, clock, epochs=1, save_interval=0.2)
    steps = saved_steps(tmp_path)
    # 19 steps and a save: 0.2 s since the saved step.
    assert {b - a for a, b in zip(steps, steps[1:], strict=False)} == {19}


@pytest.mark.parametrize("kwargs, error, match", [
    ({"save_freq": "epoch", "save_overhead": 0.05}, ValueError,
     r"`save_overhead` chooses how often save_freq='auto' saves"),
    ({"save_freq": "auto", "save_overhead": 1.5}, ValueError, "between 0 and 1"),
    ({"save_freq": "auto", "save_overhead": 0}, ValueError, "`save_overhead` must be > 0"),
    ({"save_freq": "auto", "save_overhead": "2%"}, TypeError, "`save_overhead` must be"),
    ({"save_freq": "sometimes"}, ValueError, "'epoch', 'auto' or a positive integer"),
])
def test_bad_auto_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        keras_ckpt.ModelCheckpoint("c/e.keras", **kwargs)


def test_the_config_rebuilds_an_auto_callback(tmp_path):
    cb = keras_ckpt.ModelCheckpoint(str(tmp_path / "e.keras"), save_freq="auto",
                                    save_overhead=0.05, save_interval=600)
    config = cb.get_config()
    assert (config["save_freq"], config["save_overhead"]) == ("auto", 0.05)
    again = keras_ckpt.ModelCheckpoint(**config)
    assert again.get_config() == config and again.auto_freq.max_lost == 600
    assert os.path.basename(config["filepath"]) == "e.keras"
