"""Preemption signals and exceptions during `fit`: a checkpoint at the step, then a clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import forkserver
import keras
import numpy as np
import pytest
from conftest import EpochFed, make_data, make_model
from test_exact_resume import load, run

import keras_ckpt
from keras_ckpt import manager

# Backend-sensitive: tests/test_backends.py runs this file's tests on JAX and torch too.
pytestmark = pytest.mark.backends


class SendSignal(keras.callbacks.Callback):
    """Sends `signum` to this process after global step `step` (or at a validation batch)."""

    def __init__(self, signum, step=None, val_epoch=None, times=1):
        super().__init__()
        self.signum, self.step, self.val_epoch, self.times = signum, step, val_epoch, times
        self.epoch = -1

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.step is not None and int(self.model.optimizer.iterations.numpy()) == self.step:
            for _ in range(self.times):
                signal.raise_signal(self.signum)  # in this thread: delivered at once

    def on_test_batch_end(self, batch, logs=None):
        if self.val_epoch == self.epoch and batch == 0:
            signal.raise_signal(self.signum)  # in this thread: delivered at once


def fit(model, callbacks, epochs=3, data=None, **kwargs):
    x, y = data if data is not None else make_data(n=64)
    return model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0,
                     validation_data=(x[:16], y[:16]), callbacks=callbacks, **kwargs)


def same_state(a, b):
    for va, vb in zip(a.variables + a.optimizer.variables,
                      b.variables + b.optimizer.variables, strict=True):
        np.testing.assert_array_equal(va.numpy(), vb.numpy(), err_msg=va.path)


@pytest.mark.slow
def test_sigterm_mid_epoch_exits_143_after_saving_that_step_and_resume_is_bitwise(
        tmp_path, reference_run):
    args = ["--data", "numpy", "--epochs", "3"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONHASHSEED": "0"}
    child = forkserver.Popen(
        [sys.executable, "-m", "keras_ckpt.demo_train", str(tmp_path / "run"),
         str(tmp_path / "run.npz"), *args, "--pause-at-step", "9"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env)
    assert child.stdout.readline().strip() == "paused 9"  # step 9 of 18: epoch 2, step 3
    child.send_signal(signal.SIGTERM)
    child.stdin.write("go\n")
    child.stdin.flush()
    out, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "trained 9" in out  # no step after the one the signal arrived in
    assert "stopped by SIGTERM at epoch 2, step 3" in out
    assert not (tmp_path / "run.npz").exists()  # the script did not go on after fit
    newest = manager.list_checkpoints(tmp_path / "run")[-1]
    assert (newest.epoch, newest.step, newest.epoch_complete, newest.global_step) == (
        1, 3, False, 9)
    assert not os.path.exists(tmp_path / "run" / ".keras_ckpt.lock")
    run(tmp_path / "run", tmp_path / "run.npz", *args)
    straight, history_a = reference_run(*args)
    resumed, history_b = load(tmp_path / "run.npz")
    for name in straight:
        np.testing.assert_array_equal(straight[name], resumed[name], err_msg=name)
    assert history_b.pop("resumed_from")["step"] == 3
    history_a.pop("resumed_from")
    assert history_a == history_b


def test_sigint_return_mode_saves_the_step_and_fit_returns(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    model = make_model(seed=1)
    checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "c-{epoch}.keras"), resume=True,
                                            preemption="return")
    history = fit(model, [SendSignal(signal.SIGINT, step=6), checkpoint], epochs=3)
    assert checkpoint.preempted_by == "SIGINT"
    assert int(model.optimizer.iterations.numpy()) == 6  # epoch 2, step 2 of 4
    assert history.epoch == [0, 1]  # Keras's History logs the cut-short epoch, as for any stop
    assert signal.getsignal(signal.SIGINT) is before
    newest = manager.list_checkpoints(tmp_path)[-1]
    assert (newest.epoch, newest.step, newest.epoch_complete) == (1, 2, False)
    saved = keras_ckpt.storage.read(newest.path).meta["progress"]["history"]
    assert saved["epoch"] == [0]  # the checkpoint's history holds whole epochs only

    # The same script run again finishes the job, equal to a run never interrupted.
    resumed = make_model(seed=1)
    fit(resumed, [keras_ckpt.ModelCheckpoint(str(tmp_path / "c-{epoch}.keras"), resume=True,
                                             preemption="return")], epochs=3)
    straight = make_model(seed=1)
    fit(straight, [], epochs=3)
    same_state(straight, resumed)


def test_signal_during_validation_stops_validating_and_resume_is_exact(tmp_path):
    x, y = make_data(n=64)
    data = (x, y)
    model = make_model(seed=2, metrics=["mae"])
    checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "c.keras"), resume=True,
                                            preemption="return")
    batches = []
    counter = keras.callbacks.LambdaCallback(
        on_test_batch_end=lambda batch, logs: batches.append(batch))
    fit(model, [SendSignal(signal.SIGTERM, val_epoch=1), checkpoint, counter],
        epochs=3, data=data, validation_batch_size=4)
    assert checkpoint.preempted_by == "SIGTERM"
    assert batches.count(0) == 2 and batches[-1] == 0  # epoch 2's validation stopped at once
    info = manager.list_checkpoints(tmp_path)[-1]
    assert (info.epoch, info.step, info.epoch_complete) == (1, 4, False)

    resumed = make_model(seed=2, metrics=["mae"])
    history = fit(resumed, [keras_ckpt.ModelCheckpoint(str(tmp_path / "c.keras"), resume=True)],
                  epochs=3, data=data, validation_batch_size=4)
    straight = make_model(seed=2, metrics=["mae"])
    reference = fit(straight, [], epochs=3, data=data, validation_batch_size=4)
    same_state(straight, resumed)
    assert history.history == reference.history  # training metrics of epoch 2 included


def test_second_signal_while_stopping_acts_at_once(tmp_path):
    # Python's own handler, whatever this process inherited (a background job ignores SIGINT).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = signal.getsignal(signal.SIGINT)
        model = make_model(seed=1)
        checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "c.keras"), preemption="return")
        with pytest.raises(KeyboardInterrupt):
            fit(model, [SendSignal(signal.SIGINT, step=3, times=2), checkpoint])
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert not os.path.exists(tmp_path / ".keras_ckpt.lock")  # released on the way out
    fit(make_model(seed=1), [keras_ckpt.ModelCheckpoint(str(tmp_path / "c.keras"))], epochs=1)


def test_preemption_defaults_follow_resume_and_other_threads_are_left_alone(tmp_path):
    assert keras_ckpt.ModelCheckpoint(str(tmp_path / "a.keras")).preemption is None
    assert keras_ckpt.ModelCheckpoint(str(tmp_path / "a.keras"), resume=True).preemption == "exit"
    checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "a.keras"), resume=True)
    seen = []

    class Look(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(signal.getsignal(signal.SIGTERM))

    errors = []

    def train():
        try:
            fit(make_model(seed=3), [checkpoint, Look()], epochs=1)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=train)
    thread.start()
    thread.join()
    assert not errors and seen == [before]
    assert os.path.exists(tmp_path / "a.keras")


def test_exit_mode_in_process_runs_every_on_train_end_then_exits(tmp_path):
    ended = []
    end = keras.callbacks.LambdaCallback(on_train_end=lambda logs: ended.append("after"))
    model = make_model(seed=1)
    checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "c.keras"), preemption="exit")
    stop = keras_ckpt.EarlyStopping(monitor="loss", patience=5, restore_best_weights=True)
    with pytest.raises(SystemExit) as exit_info:
        fit(model, [SendSignal(signal.SIGTERM, step=5), checkpoint, stop, end])
    assert exit_info.value.code == 143
    assert ended == ["after"]  # a callback after ModelCheckpoint still ended
    assert not os.path.exists(tmp_path / ".keras_ckpt.lock")


class Failing(EpochFed):
    """Batches of 16 in order; batch `index` of epoch `epoch` raises (a bad record)."""

    def __init__(self, x, y, fail=None):
        super().__init__()
        self.x, self.y, self.fail = x, y, fail

    def __len__(self):
        return len(self.x) // 16

    def __getitem__(self, i):
        if self.fail == (self.epoch, i):
            raise OSError("bad record")
        return self.x[i * 16:(i + 1) * 16], self.y[i * 16:(i + 1) * 16]


def fit_until_a_bad_record(model, tmp_path):
    """A fit with save_on_exception whose data fails at epoch 2, batch 3.

    Returns the newest checkpoint and the number of steps that completed.
    """
    x, y = make_data(n=64)
    checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "c-{epoch}.keras"),
                                            save_on_exception=True)
    data = Failing(x, y, fail=(1, 2))
    done = []
    count = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: done.append(1))
    with pytest.raises(Exception, match="bad record"):
        model.fit(data, epochs=3, verbose=0, callbacks=[data.feed(), checkpoint, count])
    return manager.list_checkpoints(tmp_path)[-1], done


def test_save_on_exception_leaves_the_last_completed_step(tmp_path):
    x, y = make_data(n=64)
    model = make_model(seed=4, metrics=["mae"], dropout=0.2)
    newest, done = fit_until_a_bad_record(model, tmp_path)
    # Keras's PyDataset workers fetch ahead: the bad batch 2 fails the fetch
    # of batch 1 or 2. The checkpoint holds every step that completed.
    assert (newest.epoch, newest.epoch_complete, newest.global_step) == (1, False, len(done))
    assert newest.step in (1, 2)
    assert int(model.optimizer.iterations.numpy()) == len(done)  # the failed step's count undone
    assert not os.path.exists(tmp_path / ".keras_ckpt.lock")

    resumed = make_model(seed=4, metrics=["mae"], dropout=0.2)
    history = resumed.fit(Failing(x, y), epochs=3, verbose=0, callbacks=[
        keras_ckpt.ModelCheckpoint(str(tmp_path / "c-{epoch}.keras"), resume=True)])
    straight = make_model(seed=4, metrics=["mae"], dropout=0.2)
    reference = straight.fit(Failing(x, y), epochs=3, verbose=0)
    same_state(straight, resumed)
    assert history.history == reference.history


def test_without_save_on_exception_nothing_is_written_and_the_error_propagates(tmp_path):
    x, y = make_data(n=64)
    checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "c-{epoch}.keras"))
    with pytest.raises(Exception, match="bad record"):
        data = Failing(x, y, fail=(1, 2))
        make_model(seed=4).fit(data, epochs=3, verbose=0, callbacks=[data.feed(), checkpoint])
    assert [c.epoch_complete for c in manager.list_checkpoints(tmp_path)] == [True]


def test_early_stopping_interrupt_guard_defers_to_graceful_sigint(tmp_path):
    model = make_model(seed=5)
    checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "c.keras"), preemption="return")
    stop = keras_ckpt.EarlyStopping(monitor="loss", patience=9, restore_best_weights=True,
                                    restore_on_interrupt=True)
    at_step = {}

    def record(batch, logs):
        if int(model.optimizer.iterations.numpy()) == 6:
            at_step.update({v.path: v.numpy() for v in model.variables})

    recorder = keras.callbacks.LambdaCallback(on_train_batch_end=record)
    fit(model, [stop, SendSignal(signal.SIGINT, step=6), recorder, checkpoint], epochs=4)
    assert checkpoint.preempted_by == "SIGINT"
    # The checkpoint holds the trained state at step 6, not the best weights
    # EarlyStopping put back in the model at the end.
    snapshot = keras_ckpt.storage.read(str(tmp_path / "c.keras"))
    assert snapshot.meta["progress"]["global_step"] == 6
    for i, entry in enumerate(snapshot.meta["variables"]["model"]):
        np.testing.assert_array_equal(snapshot.arrays[f"model/{i:05d}"], at_step[entry["path"]])
