"""EarlyStopping: Keras parity, restore-best however training ends, resume, opt-in stops."""

from __future__ import annotations

import math
import os
import signal
import sys
import tracemalloc

import forkserver
import keras
import numpy as np
import pytest
from conftest import EpochFed, load_demo_result, make_data, make_model
from hypothesis import given, settings
from hypothesis import strategies as st
from keras.src.utils import python_utils

import keras_ckpt


def feed(callback, model, values, key="val_loss"):
    """Runs the callback's epoch-end decisions over `values`; returns the epoch it stopped at."""
    callback.set_model(model)
    model.stop_training = False
    callback.on_train_begin()
    for epoch, value in enumerate(values):
        callback.on_epoch_end(epoch, {key: value})
        if model.stop_training:
            return epoch
    return None


@pytest.fixture(scope="module")
def model():
    return make_model()


# ------------------------------------------------------------------ Keras parity
quarters = st.integers(-40, 40).map(lambda i: i / 4)  # exact in float32 and float64


@settings(max_examples=150, deadline=None)
@given(values=st.lists(quarters, min_size=1, max_size=15),
       patience=st.integers(0, 4), min_delta=st.sampled_from([0, 0.25, 0.5]),
       baseline=st.one_of(st.none(), quarters), start=st.integers(0, 3),
       mode=st.sampled_from(["min", "max"]))
def test_decisions_match_keras_with_its_arguments(model, values, patience, min_delta, baseline,
                                                  start, mode):
    kwargs = dict(monitor="val_loss", patience=patience, min_delta=min_delta, baseline=baseline,
                  start_from_epoch=start, mode=mode)
    ours, theirs = keras_ckpt.EarlyStopping(**kwargs), keras.callbacks.EarlyStopping(**kwargs)
    assert feed(ours, model, values) == feed(theirs, model, values)
    assert ours.wait == theirs.wait and ours.stopped_epoch == theirs.stopped_epoch
    assert ours.best == (None if theirs.best is None else float(theirs.best))
    assert ours.best_epoch == theirs.best_epoch


def test_restored_weights_match_keras_on_a_real_fit():
    results = []
    for cls in (keras_ckpt.EarlyStopping, keras.callbacks.EarlyStopping):
        m = make_model(seed=4, optimizer=keras.optimizers.SGD(0.3))
        x, y = make_data(48, seed=4)
        cb = cls(monitor="val_loss", patience=1, restore_best_weights=True)
        h = m.fit(x, y, validation_data=(x[:16] * 1.5, y[:16]), epochs=30, batch_size=8,
                  verbose=0, callbacks=[cb])
        results.append((h.epoch, cb.best_epoch, [w.numpy() for w in m.weights]))
    (epochs_a, best_a, w_a), (epochs_b, best_b, w_b) = results
    assert epochs_a == epochs_b and best_a == best_b and len(epochs_a) < 30
    for a, b in zip(w_a, w_b, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_first_nan_does_not_stop_improvement(model):
    cb = keras_ckpt.EarlyStopping(patience=1)
    assert feed(cb, model, [math.nan, 3.0, 2.0, 1.0]) is None
    assert cb.best == 1.0 and cb.best_epoch == 3


def test_no_batch_level_hooks():
    cb = keras_ckpt.EarlyStopping(restore_best_weights=True, restore_on_interrupt=True)
    for hook in ("on_batch_end", "on_train_batch_end", "on_test_batch_end"):
        assert python_utils.is_default(getattr(cb, hook))


# ------------------------------------------------------------------ opt-in stops
@pytest.mark.parametrize("kwargs, values, epoch, reason", [
    ({"check_finite": True, "patience": 10}, [3.0, 2.0, math.nan, 1.0], 2, "non-finite"),
    ({"check_finite": True, "patience": 10}, [3.0, math.inf], 1, "non-finite"),
    ({"stopping_threshold": 1.5, "patience": 10}, [3.0, 2.0, 1.5, 1.0], 2, "threshold"),
    ({"divergence_threshold": 5.0, "patience": 10}, [3.0, 2.0, 6.0, 1.0], 2, "divergence"),
    ({"mode": "max", "stopping_threshold": 0.9, "monitor": "val_acc"}, [0.5, 0.95], 1,
     "threshold"),
    ({"patience": 1}, [3.0, 3.5, 3.6], 1, "patience"),
])
def test_opt_in_stops_at_the_expected_epoch(model, kwargs, values, epoch, reason):
    key = kwargs.get("monitor", "val_loss")
    cb = keras_ckpt.EarlyStopping(**kwargs)
    assert feed(cb, model, values, key=key) == epoch
    assert cb.stop_reason == reason and cb.stopped_epoch == epoch


def test_nan_counts_towards_patience_without_check_finite(model):
    cb = keras_ckpt.EarlyStopping(patience=2)
    assert feed(cb, model, [1.0, math.nan, math.nan, 0.5]) == 2


def test_relative_min_delta(model):
    cb = keras_ckpt.EarlyStopping(patience=0, min_delta=0.1, min_delta_mode="relative")
    assert feed(cb, model, [10.0, 8.0, 7.5]) == 2  # 7.5 is not 10% below 8.0


# ------------------------------------------------------------------ restore-best
def weights_of(model):
    return [w.numpy().copy() for w in model.weights]


class BestTracker(keras.callbacks.Callback):
    """Records the weights at the end of every epoch."""

    def __init__(self):
        super().__init__()
        self.by_epoch = {}

    def on_epoch_end(self, epoch, logs=None):
        self.by_epoch[epoch] = (logs["val_loss"], weights_of(self.model))


def fit_and_track(callbacks, epochs=6, lr=0.05, data=None):
    model = make_model(seed=2, optimizer=keras.optimizers.SGD(lr))
    x, y = make_data(48, seed=2)
    tracker = BestTracker()
    model.fit(data if data is not None else x, None if data is not None else y,
              validation_data=(x[:16] * 2, y[:16]), batch_size=8, epochs=epochs, verbose=0,
              callbacks=[tracker, *callbacks])
    return model, tracker


def assert_has_best(model, tracker, upto=None):
    epochs = {e: v for e, v in tracker.by_epoch.items() if upto is None or e <= upto}
    best = min(epochs, key=lambda e: epochs[e][0])
    for a, b in zip(weights_of(model), epochs[best][1], strict=True):
        np.testing.assert_array_equal(a, b)
    return best


def test_restore_best_when_training_runs_to_the_last_epoch():
    cb = keras_ckpt.EarlyStopping(patience=100, restore_best_weights=True)
    model, tracker = fit_and_track([cb], epochs=5, lr=0.05)
    assert cb.stop_reason is None
    assert assert_has_best(model, tracker) == cb.best_epoch


def test_restore_best_when_another_callback_stops_training():
    class StopAt2(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 2:
                self.model.stop_training = True

    cb = keras_ckpt.EarlyStopping(patience=100, restore_best_weights=True)
    model, tracker = fit_and_track([StopAt2(), cb], epochs=8, lr=0.05)
    assert max(tracker.by_epoch) == 2
    assert_has_best(model, tracker)


def test_restore_best_on_keyboard_interrupt():
    class CtrlC(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 3:
                os.kill(os.getpid(), signal.SIGINT)

    cb = keras_ckpt.EarlyStopping(patience=100, restore_best_weights=True,
                                  restore_on_interrupt=True)
    tracker = BestTracker()
    model = make_model(seed=2, optimizer=keras.optimizers.SGD(0.05))
    x, y = make_data(48, seed=2)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, validation_data=(x[:16] * 2, y[:16]), batch_size=8, epochs=8,
                  verbose=0, callbacks=[tracker, cb, CtrlC()])
    assert signal.getsignal(signal.SIGINT) is handler  # put back
    assert_has_best(model, tracker, upto=3)


class Exploding(EpochFed):
    """Data that fails at batch `at` of epoch `epoch`."""

    def __init__(self, epoch, at):
        super().__init__()
        self.x, self.y = make_data(48, seed=2)
        self.fail_epoch, self.at = epoch, at

    def __len__(self):
        return 6

    def __getitem__(self, i):
        if self.epoch == self.fail_epoch and i == self.at:
            raise RuntimeError("disk read failed")
        return self.x[i * 8:(i + 1) * 8], self.y[i * 8:(i + 1) * 8]


@pytest.mark.backends
@pytest.mark.parametrize("opt_in", [True, False])
def test_restore_best_on_an_exception_only_when_asked(opt_in):
    cb = keras_ckpt.EarlyStopping(patience=100, restore_best_weights=True,
                                  restore_on_interrupt=opt_in)
    tracker = BestTracker()
    model = make_model(seed=2, optimizer=keras.optimizers.SGD(0.05))
    x, y = make_data(48, seed=2)
    with pytest.raises(Exception, match="disk read failed"):
        data = Exploding(epoch=3, at=2)
        model.fit(data, validation_data=(x[:16] * 2, y[:16]),
                  epochs=8, verbose=0, callbacks=[data.feed(), tracker, cb], shuffle=False)
    if opt_in:
        assert_has_best(model, tracker, upto=2)
    else:
        best = min(tracker.by_epoch, key=lambda e: tracker.by_epoch[e][0])
        assert not all(np.array_equal(a, b) for a, b in
                       zip(weights_of(model), tracker.by_epoch[best][1], strict=True))


def test_best_weights_cost_at_most_one_copy(model):
    cb = keras_ckpt.EarlyStopping(restore_best_weights=True)
    feed(cb, model, [5.0, 4.0])
    size = sum(w.numpy().nbytes for w in model.weights)
    assert sum(a.nbytes for a in cb.best_weights) == size
    tracemalloc.start()
    try:
        cb.on_epoch_end(2, {"val_loss": 3.0})  # an improvement: a new copy replaces the old
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * size + 64 * 1024


def test_on_disk_best_weights(tmp_path):
    path = tmp_path / "best.weights.h5"
    cb = keras_ckpt.EarlyStopping(patience=100, restore_best_weights=True,
                                  best_weights_path=path)
    model, tracker = fit_and_track([cb], epochs=5, lr=0.05)
    assert cb.best_weights is None and path.exists()
    assert_has_best(model, tracker)


def test_on_disk_best_weights_come_back_one_array_at_a_time(tmp_path):
    """Verified whole first, then each array read as `set_weights` assigns it."""
    model = keras.Sequential([keras.Input((512,))] + [keras.layers.Dense(512) for _ in range(16)])
    cb = keras_ckpt.EarlyStopping(patience=1, restore_best_weights=True,
                                  best_weights_path=tmp_path / "best.weights.h5")
    best = [w.numpy() for w in model.weights]
    cb.set_model(model)
    model.stop_training = False
    cb.on_train_begin()
    cb.on_epoch_end(0, {"val_loss": 1.0})  # the best epoch: written to the file
    for w in model.weights:
        w.assign(np.zeros(w.shape, w.dtype))
    size = sum(a.nbytes for a in best)
    tracemalloc.start()
    try:
        for epoch in (1, 2):
            cb.on_epoch_end(epoch, {"val_loss": 2.0})
        cb.on_train_end()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert model.stop_training
    for a, w in zip(best, model.weights, strict=True):
        np.testing.assert_array_equal(a, w.numpy())
    assert peak < 0.3 * size, peak / size  # the whole file was 1.0x


# ------------------------------------------------------------------ resume
def test_resumed_run_that_had_stopped_trains_no_further(tmp_path, capsys):
    path = str(tmp_path / "e{epoch}.keras")
    x, y = make_data(48, seed=2)
    val = (x[:16] * 2, y[:16])
    first = make_model(seed=2, optimizer=keras.optimizers.SGD(0.05))
    stop = keras_ckpt.EarlyStopping(patience=1, restore_best_weights=True, min_delta=10.0)
    first.fit(x, y, validation_data=val, epochs=10, batch_size=8, verbose=0,
              callbacks=[keras_ckpt.ModelCheckpoint(path), stop])
    assert stop.stop_reason == "patience"
    again = make_model(seed=2, optimizer=keras.optimizers.SGD(0.05))
    stop2 = keras_ckpt.EarlyStopping(patience=1, restore_best_weights=True, min_delta=10.0)
    history = again.fit(x, y, validation_data=val, epochs=10, batch_size=8, verbose=0,
                        callbacks=[stop2, keras_ckpt.ModelCheckpoint(path, resume=True)])
    assert "already stopped training" in capsys.readouterr().out
    assert int(again.optimizer.iterations.numpy()) == int(first.optimizer.iterations.numpy())
    assert len(history.history["loss"]) == stop.stopped_epoch + 1
    for a, b in zip(first.weights, again.weights, strict=True):  # best weights restored again
        np.testing.assert_array_equal(a.numpy(), b.numpy())


EARLY_STOPPING = ["--epochs", "20", "--early-stopping", "2"]


def run_child(directory, out, *args, expect_kill=False):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONHASHSEED": "0"}
    command = [sys.executable, "-m", "keras_ckpt.demo_train", str(directory), str(out),
               *EARLY_STOPPING, *args]
    proc = forkserver.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == (-signal.SIGKILL if expect_kill else 0), proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("disk", [pytest.param(False, marks=pytest.mark.backends), True],
                         ids=["memory", "on-disk"])
def test_killed_run_stops_at_the_same_epoch_with_the_same_weights(tmp_path, disk,
                                                                 reference_run):
    # The uninterrupted reference keeps its best weights in memory: the killed
    # run, with them in memory or on disk, must end exactly like it.
    extra = ["--best-on-disk"] if disk else []
    a, outcome_a = reference_run(*EARLY_STOPPING)
    run_child(tmp_path / "b", tmp_path / "b.npz", *extra, "--kill-epoch", "4", expect_kill=True)
    run_child(tmp_path / "b", tmp_path / "b.npz", *extra)
    b, outcome_b = load_demo_result(tmp_path / "b.npz")
    assert outcome_a["stop_reason"] == "patience" and outcome_a["stopped_epoch"] > 4
    assert outcome_a.pop("resumed_from") is None
    assert outcome_b.pop("resumed_from")["epoch"] == 4  # resumed after the kill
    assert outcome_a == outcome_b
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"patience": -1}, ValueError, "`patience` must be >= 0"),
    ({"min_delta": -0.5}, ValueError, "`min_delta` must be >= 0"),
    ({"restore_best_weights": "yes"}, TypeError, "`restore_best_weights`"),
    ({"stopping_threshold": "low"}, TypeError, "`stopping_threshold`"),
    ({"best_weights_path": "best.h5", "restore_best_weights": True}, ValueError, ".weights.h5"),
    ({"best_weights_path": "b.weights.h5"}, ValueError, "restore_best_weights=True"),
])
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        keras_ckpt.EarlyStopping(**kwargs)


def test_unknown_mode_warns_and_falls_back_to_auto_as_keras_does():
    # Keras's MonitorCallback warns and infers the direction; it does not refuse.
    with pytest.warns(UserWarning, match="EarlyStopping mode 'up' is unknown, fallback to auto"):
        cb = keras_ckpt.EarlyStopping(monitor="val_loss", mode="up")
    assert cb.mode == "auto" and cb.get_config()["mode"] == "auto"
    model = make_model()
    x, y = make_data(16)
    model.fit(x, y, validation_split=0.5, epochs=1, verbose=0, callbacks=[cb])
    assert cb.monitor_op is keras.ops.less


def test_keras_attributes_read_and_write_the_comparator():
    model = make_model(metrics=["accuracy"])
    cb = keras_ckpt.EarlyStopping(monitor="val_loss", patience=2)
    assert cb.monitor_op is None  # mode="auto": known at train begin, as in Keras
    cb.set_model(model)
    cb._set_monitor_op()
    assert cb.monitor_op is keras.ops.less
    assert keras_ckpt.EarlyStopping(monitor="loss", mode="max").monitor_op is keras.ops.greater
    cb.best, cb.wait = 0.25, 1
    assert (cb.best, cb.wait) == (0.25, 1)
    assert cb._monitor.get_state()["best"] == 0.25 and cb._monitor.wait == 1
    cb.epoch_end(1, {"val_loss": 0.3})  # no improvement on the best that was set
    assert (cb.best, cb.wait, model.stop_training) == (0.25, 2, True)


def test_best_weights_come_from_get_weights_and_go_back_through_set_weights():
    class Weights:  # a model only through its public weights API, as Keras's test uses
        stop_training = False
        weights = "epoch 0"

        def get_weights(self):
            return self.weights

        def set_weights(self, weights):
            self.weights = weights

    cb = keras_ckpt.EarlyStopping(monitor="val_loss", patience=1, restore_best_weights=True)
    cb.set_model(Weights())
    cb.on_train_begin()
    for epoch, loss in enumerate([0.2, 0.1, 0.3, 0.4]):
        cb.model.weights = f"epoch {epoch}"
        cb.on_epoch_end(epoch, {"val_loss": loss})
        if cb.model.stop_training:
            break
    cb.on_train_end()
    assert (cb.stopped_epoch, cb.model.weights) == (2, "epoch 1")


def test_a_one_element_array_is_a_scalar_value():
    model = make_model(classes=2, metrics=[keras.metrics.F1Score(name="f1", threshold=0.5)])
    x, y = make_data(32, classes=2)
    cb = keras_ckpt.EarlyStopping(monitor="val_f1", patience=5)
    model.fit(x, y.reshape(-1, 1).astype("float32"), validation_split=0.5, epochs=2, verbose=0,
              callbacks=[cb])
    assert cb.monitor_op is keras.ops.greater and isinstance(cb.best, float)


def test_unknown_direction_fails_at_train_begin():
    def score(y_true, y_pred):
        return keras.ops.mean(y_pred)

    model = make_model(metrics=[score])
    x, y = make_data(16)
    with pytest.raises(ValueError, match="val_score"):
        model.fit(x, y, validation_split=0.5, epochs=2, verbose=0,
                  callbacks=[keras_ckpt.EarlyStopping(monitor="val_score")])
    assert int(model.optimizer.iterations.numpy()) == 0


def test_on_disk_best_weights_from_a_lost_future_are_not_restored(tmp_path, model):
    path = tmp_path / "best.weights.h5"
    cb = keras_ckpt.EarlyStopping(patience=100, restore_best_weights=True,
                                  best_weights_path=path)
    feed(cb, model, [3.0, 2.0])
    at_best = weights_of(model)
    state = cb.get_state()  # what a checkpoint after epoch 2 holds
    model.set_weights([w + 1 for w in at_best])
    cb.on_epoch_end(2, {"val_loss": 1.0})  # a new best is written, then the process dies
    resumed = keras_ckpt.EarlyStopping(patience=100, restore_best_weights=True,
                                       best_weights_path=path)
    resumed.set_model(model)
    resumed.set_state(state)
    resumed.on_train_end()  # the best of epoch 2 is still there, in the previous slot
    for a, b in zip(at_best, weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)

    cb.on_epoch_end(3, {"val_loss": 0.5})  # two new bests: epoch 2's is gone
    model.set_weights([w + 2 for w in at_best])
    before = weights_of(model)
    with pytest.warns(UserWarning, match="best weights of epoch 2.*epoch 4.*epoch 3"):
        resumed.on_train_end()
    for a, b in zip(before, weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)
