"""TerminateOnNaN: where it stops, what it never saves, rollback, raise, weight checks."""

from __future__ import annotations

import math
import threading

import keras
import numpy as np
import pytest
from conftest import EpochFed, make_data, make_model
from keras.src.utils import python_utils

import keras_ckpt

# Backend-sensitive: tests/test_backends.py runs this file's tests on JAX and torch too.
pytestmark = pytest.mark.backends


class Poisoned(EpochFed):
    """6 batches of 8 an epoch; the batch of global step `at` (1-based) has `value` targets."""

    def __init__(self, at=None, value=math.nan, batches=6):
        super().__init__()
        self.x, self.y = make_data(8 * batches, seed=3)
        self.value, self.batches, self.epoch = value, batches, -1
        self.at = None if at is None else divmod(at - 1, batches)  # (epoch, index)

    def __len__(self):
        return self.batches

    def __getitem__(self, i):
        y = self.y[i * 8:(i + 1) * 8].copy()
        if self.at == (self.epoch, i):
            y[:] = self.value
        return self.x[i * 8:(i + 1) * 8], y


def fit(model, data, callbacks, epochs=3, **kw):
    if isinstance(data, Poisoned):
        callbacks = [data.feed(), *callbacks]
    return model.fit(data, epochs=epochs, verbose=0, callbacks=callbacks, shuffle=False, **kw)


def iterations(model):
    return int(model.optimizer.iterations.numpy())


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_stops_at_the_poisoned_step(value):
    model = make_model()
    guard = keras_ckpt.TerminateOnNaN()
    fit(model, Poisoned(at=9, value=value), [guard])
    if keras.backend.backend() == "tensorflow":
        assert iterations(model) == 9
    else:  # the check runs on Keras's callback thread, beside the next step(s)
        assert 9 <= iterations(model) <= 12
    event = guard.events[0]
    assert (event.epoch, event.step, event.key, event.action) == (1, 3, "loss", "stop")


def test_hooks_out_of_order_on_the_callback_pool_keep_the_earliest_step(capsys):
    # Keras's JAX/torch callback pool can run step 4's hook before step 3's;
    # the event kept (and printed, once, at epoch end) is the earliest step.
    model = make_model()
    guard = keras_ckpt.TerminateOnNaN()
    guard.set_model(model)
    guard.on_train_begin()
    guard.on_epoch_begin(1)
    for batch, loss in [(1, 0.5), (3, math.nan), (2, math.inf)]:
        pool = threading.Thread(target=guard.on_train_batch_end, args=(batch, {"loss": loss}))
        pool.start()
        pool.join()
    assert model.stop_training and "TerminateOnNaN" not in capsys.readouterr().out
    guard.on_epoch_end(1, {"loss": math.nan})
    printed = capsys.readouterr().out
    assert printed.count("TerminateOnNaN") == 1 and "epoch 2, step 3: loss = inf" in printed
    assert [(e.epoch, e.step, e.value) for e in guard.events] == [(1, 3, math.inf)]
    assert guard.blocks_saving() is not None
    guard.on_train_end()
    assert "TerminateOnNaN" not in capsys.readouterr().out


def test_nan_in_validation_only_is_caught():
    model = make_model()
    x, y = make_data(16, seed=1)
    guard = keras_ckpt.TerminateOnNaN()
    history = fit(model, Poisoned(), [guard], epochs=3, validation_data=(x, y * np.nan))
    assert len(history.epoch) == 1
    assert guard.events[0].key == "val_loss" and guard.events[0].step is None


def test_checkpoints_after_the_stop_are_finite_and_loadable(tmp_path):
    model = make_model()
    every = keras_ckpt.ModelCheckpoint(str(tmp_path / "s-{epoch}-{batch}.keras"), save_freq=2)
    best = keras_ckpt.ModelCheckpoint(str(tmp_path / "best.keras"), monitor="loss",
                                      save_best_only=True)
    guard = keras_ckpt.TerminateOnNaN()
    with pytest.warns(UserWarning, match="not finite"):
        fit(model, Poisoned(at=10), [every, best, guard], epochs=3)
    infos = keras_ckpt.list_checkpoints(tmp_path)
    assert infos and all(c.finite for c in infos)
    assert max(c.global_step for c in infos) == 8  # the step-10 save was refused
    for info in infos:
        fresh = make_model(seed=7)
        keras_ckpt.restore(fresh, info.path)
        assert all(np.isfinite(v.numpy()).all() for v in fresh.variables)
    assert keras_ckpt.latest_checkpoint(tmp_path)[0].global_step == 8


def test_raise_mode_names_the_step_and_key():
    model = make_model()
    guard = keras_ckpt.TerminateOnNaN(raise_error=True)
    with pytest.raises(RuntimeError, match=r"epoch 2, step 2: loss = nan") as raised:
        fit(model, Poisoned(at=8), [guard])
    assert guard.events[0].action == "raise"
    # Keras's words and 0-based batch index first, for code that matches on them.
    assert str(raised.value).startswith("NaN or Inf loss encountered at batch 1. ")


def test_the_stop_message_says_what_keras_prints(capsys):
    model = make_model()
    fit(model, Poisoned(at=9), [keras_ckpt.TerminateOnNaN()])
    printed = capsys.readouterr().out
    assert "Batch 2: Invalid loss, terminating training" in printed
    assert "TerminateOnNaN: non-finite value at epoch 2, step 3: loss = nan" in printed


def test_weight_check_catches_a_nan_weight_before_the_loss():
    class Corrupt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if self.model.optimizer.iterations.numpy() == 4:
                kernel = self.model.layers[-1].kernel
                kernel.assign(np.where(np.arange(kernel.shape[0])[:, None] == 0, np.nan,
                                       kernel.numpy()))

    model = make_model()
    guard = keras_ckpt.TerminateOnNaN(check_weights=1)
    fit(model, Poisoned(), [Corrupt(), guard])
    event = guard.events[0]
    assert event.key.endswith("kernel") and event.value is None and event.step == 4
    assert iterations(model) == 4


class TooHighOnce(keras.callbacks.Callback):
    """Sets a learning rate that diverges, once, at the start of epoch 2."""

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            self.model.optimizer.learning_rate.assign(1e6)


def test_rollback_turns_a_diverging_run_into_a_finite_one(tmp_path):
    model = make_model(optimizer=keras.optimizers.SGD(0.01))
    guard = keras_ckpt.TerminateOnNaN(action="rollback", lr_factor=0.5, max_retries=3,
                                      verbose=0)
    checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "e{epoch}.keras"))
    history = fit(model, Poisoned(), [TooHighOnce(), checkpoint, guard], epochs=4)
    assert len(history.epoch) == 4 and all(math.isfinite(v) for v in history.history["loss"])
    assert guard.retries == 1 and guard.events[0].action == "rollback"
    # Rolled back to the end of epoch 1 (lr 0.01), then halved.
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(0.005)
    assert all(c.finite for c in keras_ckpt.list_checkpoints(tmp_path))
    saved = keras_ckpt.storage.read_meta(keras_ckpt.list_checkpoints(tmp_path)[-1].path)
    assert saved["objects"]["TerminateOnNaN"]["json"]["events"][0]["value"] in ("nan", "inf")


def test_rollback_from_the_newest_checkpoint(tmp_path):
    model = make_model(optimizer=keras.optimizers.SGD(0.01))
    guard = keras_ckpt.TerminateOnNaN(action="rollback", rollback_from="checkpoint",
                                      lr_factor=0.5, verbose=0)
    checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "e{epoch}.keras"))
    history = fit(model, Poisoned(), [TooHighOnce(), checkpoint, guard], epochs=3)
    assert len(history.epoch) == 3 and guard.retries == 1
    assert all(np.isfinite(v.numpy()).all() for v in model.variables)


def test_rollback_gives_up_after_max_retries():
    class AlwaysTooHigh(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if self.model.optimizer.iterations.numpy() >= 6:
                self.model.optimizer.learning_rate.assign(1e12)

    model = make_model(optimizer=keras.optimizers.SGD(0.01))
    guard = keras_ckpt.TerminateOnNaN(action="rollback", max_retries=2, verbose=0)
    history = fit(model, Poisoned(), [AlwaysTooHigh(), guard], epochs=5)
    assert [e.action for e in guard.events] == ["rollback", "rollback", "stop"]
    assert guard.retries == 2 and len(history.epoch) < 5


def test_four_callbacks_agree_nothing_non_finite_is_saved_restored_or_resumed(tmp_path):
    path = str(tmp_path / "e{epoch}-{batch}.keras")
    x, y = make_data(16, seed=1)
    clock = [1_800_000_000.0]

    def callbacks(**resume):
        class Tick(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                clock[0] += 1.0

        return [Tick(), keras_ckpt.ModelCheckpoint(path, save_freq=2, **resume),
                keras_ckpt.EarlyStopping(monitor="val_loss", patience=5,
                                         restore_best_weights=True),
                keras_ckpt.BudgetStop(max_duration=17.5, clock=lambda: clock[0], verbose=0,
                                      ledger=str(tmp_path / "ledger.json")),
                keras_ckpt.TerminateOnNaN()]

    model = make_model()
    first = callbacks()
    with pytest.warns(UserWarning, match="not finite"):
        fit(model, Poisoned(at=12), first, epochs=4, validation_data=(x, y))
    assert first[-1].events[0].step == 6 and first[3].stop_reason is None
    assert all(np.isfinite(v.numpy()).all() for v in model.weights)  # best weights restored
    assert all(c.finite for c in keras_ckpt.list_checkpoints(tmp_path))
    resumed = make_model()
    second = callbacks(resume=True)
    # (The resumed fit skips the 4 trained batches of epoch 2 unseen: no Tick.)
    fit(resumed, Poisoned(), second, epochs=5, validation_data=(x, y))
    assert second[1].resumed_from.global_step == 10
    assert second[3].stop_reason == "max-duration"  # then the budget stops it, saved
    assert all(np.isfinite(v.numpy()).all() for v in resumed.variables)
    infos = keras_ckpt.list_checkpoints(tmp_path)
    assert all(c.finite for c in infos) and infos[-1].path == second[3].checkpoint


def test_defaults_and_hooks():
    guard = keras_ckpt.TerminateOnNaN()
    assert guard.action == "stop" and guard.async_safe
    assert not python_utils.is_default(guard.on_train_batch_end)
    assert not keras_ckpt.TerminateOnNaN(action="rollback").async_safe


@pytest.mark.parametrize("kwargs, error, match", [
    ({"action": "ignore"}, ValueError, "`action` must be one of"),
    ({"raise_error": True, "action": "stop"}, ValueError, "contradicts"),
    ({"check_weights": "always"}, ValueError, "`check_weights`"),
    ({"check_weights": 0}, ValueError, "`check_weights` must be >= 1"),
    ({"action": "rollback", "lr_factor": 2.0}, ValueError, r"`lr_factor` must be in \(0, 1\]"),
    ({"action": "rollback", "max_retries": -1}, ValueError, "`max_retries` must be >= 0"),
    ({"snapshot_every": 5}, ValueError, "apply to action='rollback'"),
    ({"rollback_from": "disk", "action": "rollback"}, ValueError, "`rollback_from`"),
])
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        keras_ckpt.TerminateOnNaN(**kwargs)


def test_lr_factor_with_a_schedule_fails_at_train_begin():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, 10, 0.9)
    model = make_model(optimizer=keras.optimizers.Adam(schedule))
    guard = keras_ckpt.TerminateOnNaN(action="rollback", lr_factor=0.5)
    with pytest.raises(ValueError, match="not a schedule"):
        fit(model, Poisoned(), [guard])
    assert iterations(model) == 0


def test_first_snapshot_is_the_resumed_state_whatever_the_order(tmp_path):
    path = str(tmp_path / "e{epoch}.keras")
    fit(make_model(), Poisoned(), [keras_ckpt.ModelCheckpoint(path)], epochs=2)
    model = make_model(seed=9)
    guard = keras_ckpt.TerminateOnNaN(action="rollback", verbose=0)
    # The guard comes first: its on_train_begin runs before the resume restores the model.
    # The resumed fit starts at epoch index 2: at=14 poisons that epoch's 2nd batch.
    fit(model, Poisoned(at=14), [guard, keras_ckpt.ModelCheckpoint(path, resume=True)],
        epochs=3)
    assert guard.retries == 1 and guard.events[0].step == 2
    # Rolled back to the resumed state (12 steps done), not to the fresh seed-9 model (0),
    # then trained the epoch's last 4 steps.
    assert int(model.optimizer.iterations.numpy()) == 12 + 4
