"""One fit, one session: whatever ends a fit, what it acquired or changed is undone once.

Each test here is one of the defects of issue 15, seen on a real fit.
"""

from __future__ import annotations

import datetime
import io
import os
import signal
import sys

import keras
import numpy as np
import pytest
from conftest import make_data, make_model

import keras_ckpt
from keras_ckpt import dirlock, inspect, registry, storage

X, Y = make_data(32, seed=3)  # 2 steps of 16 per epoch


def fit(model, callbacks, epochs=3, **kwargs):
    return model.fit(X, Y, batch_size=16, epochs=epochs, shuffle=False, verbose=0,
                     callbacks=callbacks, **kwargs)


def lock_file(directory) -> str:
    return os.path.join(directory, ".keras_ckpt.lock")


class Poison(keras.callbacks.Callback):
    """Makes the loss NaN in the logs of global step `step` (before TerminateOnNaN sees it)."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            logs["loss"] = float("nan")


class FakeClock:
    def __init__(self, t=1_800_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


# ------------------------------------------------------------------ 1, 2: aborts
def test_a_sibling_raising_mid_fit_restores_handlers_lock_and_start_epoch(tmp_path):
    model = make_model()
    template = str(tmp_path / "c-{epoch}.keras")
    fit(model, [keras_ckpt.ModelCheckpoint(template)], epochs=2)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    resumed = make_model()
    with pytest.raises(RuntimeError, match="non-finite"):
        fit(resumed, [Poison(step=5), keras_ckpt.ModelCheckpoint(template, resume=True),
                      keras_ckpt.TerminateOnNaN(raise_error=True)], epochs=4)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert not os.path.exists(lock_file(tmp_path))
    assert resumed._initial_epoch is None
    history = fit(resumed, [], epochs=4)  # a plain fit afterwards trains all its epochs
    assert history.epoch == [0, 1, 2, 3]


def test_a_budget_spent_at_train_begin_releases_what_the_checkpoint_took(tmp_path):
    clock = FakeClock()
    ledger = str(tmp_path / "ledger.json")
    budget = dict(daily_budget=datetime.timedelta(seconds=10), ledger=ledger, clock=clock,
                  verbose=0)

    class Tick(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            clock.t += 20

    template = str(tmp_path / "c-{epoch}.keras")
    model = make_model()
    fit(model, [Tick(), keras_ckpt.ModelCheckpoint(template, resume=True),
                keras_ckpt.BudgetStop(**budget)], epochs=3)
    before = signal.getsignal(signal.SIGTERM)
    again = make_model()
    with pytest.raises(keras_ckpt.BudgetExhaustedError):
        fit(again, [keras_ckpt.ModelCheckpoint(template, resume=True),
                    keras_ckpt.BudgetStop(raise_if_exhausted=True, **budget)], epochs=3)
    assert signal.getsignal(signal.SIGTERM) == before
    assert not os.path.exists(lock_file(tmp_path))
    assert again._initial_epoch is None
    dirlock.acquire(str(tmp_path), object())  # free for the next process


def test_a_failed_write_raised_in_train_end_clears_the_start_epoch(tmp_path):
    template = str(tmp_path / "c-{epoch}.keras")
    model = make_model()
    fit(model, [keras_ckpt.ModelCheckpoint(template)], epochs=2)
    os.mkdir(tmp_path / "c-4.keras")  # epoch 4's write fails (in the background)
    resumed = make_model()
    with pytest.raises(OSError):
        fit(resumed, [keras_ckpt.ModelCheckpoint(template, resume=True, async_write=True,
                                                 on_save_error="raise")], epochs=4)
    assert resumed._initial_epoch is None
    assert not os.path.exists(lock_file(tmp_path))
    assert fit(resumed, [], epochs=4).epoch == [0, 1, 2, 3]


# ------------------------------------------------------------------ 3: placeholders in directories
def test_a_placeholder_in_the_directory_part_resumes(tmp_path):
    template = str(tmp_path / "run" / "ep{epoch}" / "m.keras")
    fit(make_model(), [keras_ckpt.ModelCheckpoint(template)], epochs=2)
    assert sorted(os.listdir(tmp_path / "run")) == ["ep1", "ep2"]
    cb = keras_ckpt.ModelCheckpoint(template, resume=True)
    resumed = make_model()
    history = fit(resumed, [cb], epochs=4)
    assert cb.directory == str(tmp_path / "run")
    assert cb.resumed_from is not None and cb.resumed_from.path.endswith("ep2/m.keras")
    assert history.epoch == [0, 1, 2, 3] and int(resumed.optimizer.iterations.numpy()) == 8
    assert sorted(os.listdir(tmp_path / "run")) == ["ep1", "ep2", "ep3", "ep4"]


# ------------------------------------------------------------------ 5: the `last` copy
def test_the_last_copy_is_not_a_checkpoint_for_retention_or_inspect(tmp_path):
    cb = keras_ckpt.ModelCheckpoint(str(tmp_path / "{epoch}.keras"), save_last=True,
                                    retention=[keras_ckpt.KeepLast(2)])
    fit(make_model(), [cb], epochs=4)
    assert sorted(os.listdir(tmp_path)) == ["3.keras", "4.keras", "last.keras"]
    kinds = {os.path.basename(r["path"]): r["kind"] for r in inspect.describe(str(tmp_path))}
    assert kinds == {"3.keras": "regular", "4.keras": "regular", "last.keras": "last"}


# ------------------------------------------------------------------ 6: best only when written
class Score(keras.callbacks.Callback):
    """Puts `values[epoch]` into the epoch's logs as `score` (before the checkpoint reads them)."""

    def __init__(self, values):
        super().__init__()
        self.values = values

    def on_epoch_end(self, epoch, logs=None):
        logs["score"] = self.values[epoch]


@pytest.mark.parametrize("async_write", [False, True])
def test_a_failed_best_save_leaves_the_best_a_file_holds(tmp_path, async_write):
    template = str(tmp_path / "b" / "{epoch}" / "m.keras")
    os.makedirs(tmp_path / "b")
    (tmp_path / "b" / "2").write_text("blocks epoch 2's directory")
    cb = keras_ckpt.ModelCheckpoint(template, monitor="score", mode="min", save_best_only=True,
                                    async_write=async_write)
    with pytest.warns(UserWarning, match="FAILED"):
        fit(make_model(), [Score([1.0, 0.5, 0.7]), cb], epochs=3)
    assert len(cb.save_errors) == 1 and "/2/m.keras" in cb.save_errors[0]
    assert cb.best == 0.7  # 0.7 beats 1.0, the best any file holds
    assert cb.best_path == cb.last_saved_path == str(tmp_path / "b" / "3" / "m.keras")
    assert os.path.isfile(cb.best_path)


# ------------------------------------------------------------------ 7: subclass hooks
def test_a_subclass_batch_hook_is_called(tmp_path):
    class Counting(keras_ckpt.ModelCheckpoint):
        calls = 0

        def on_train_batch_end(self, batch, logs=None):
            Counting.calls += 1
            super().on_train_batch_end(batch, logs)

    cb = Counting(str(tmp_path / "c-{epoch}-{batch}.keras"), save_freq=2)
    fit(make_model(), [cb], epochs=2)
    assert Counting.calls == 4
    assert len(keras_ckpt.list_checkpoints(tmp_path)) == 2


# ------------------------------------------------------------------ 8: workers' signals
class TwoWorkers:
    """The all-reduce of two workers: `sum` adds this worker's value and the other's."""

    count, is_chief = 2, True

    def __init__(self, other_value):
        self.other_value = other_value

    def sum(self, value):
        return float(value + self.other_value)


@pytest.mark.parametrize("mine,other,agreed", [
    (signal.SIGTERM, signal.SIGINT, signal.SIGTERM), (signal.SIGINT, signal.SIGTERM,
                                                      signal.SIGTERM),
    (None, signal.SIGINT, signal.SIGINT), (signal.SIGINT, signal.SIGINT, signal.SIGINT),
    (None, None, None)])
def test_workers_agree_on_one_of_the_signals_received(tmp_path, mine, other, agreed):
    from keras_ckpt.callbacks.model_checkpoint.preemption import Preemption

    cb = keras_ckpt.ModelCheckpoint(str(tmp_path / "c.keras"), resume=True)
    stops = Preemption(cb)
    signals = stops.catcher.signals  # SIGTERM first, then SIGINT
    base = TwoWorkers.count + 1
    cb.workers = TwoWorkers(0 if other is None else base ** signals.index(other))
    stops.catcher.pending = mine
    assert stops.pending() is (agreed is not None)
    assert stops.catcher.pending == agreed


# ------------------------------------------------------------------ 11: data helpers per model
def test_data_helpers_belong_to_the_model_whose_fit_used_them(tmp_path):
    tf = pytest.importorskip("tensorflow")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("EpochShuffle is a tf.data helper")

    def dataset(shuffle):
        return tf.data.Dataset.from_tensor_slices((X, Y)).apply(shuffle).batch(16)

    shuffle_a = keras_ckpt.data.EpochShuffle(8, seed=1, name="a")
    model_a = make_model()
    model_a.fit(dataset(shuffle_a), epochs=2, verbose=0,
                callbacks=[keras_ckpt.ModelCheckpoint(str(tmp_path / "a" / "{epoch}.keras"))])
    shuffle_b = keras_ckpt.data.EpochShuffle(8, seed=2, name="b")
    model_b = make_model()
    cb_b = keras_ckpt.ModelCheckpoint(str(tmp_path / "b" / "{epoch}.keras"))
    model_b.fit(dataset(shuffle_b), epochs=1, verbose=0, callbacks=[cb_b])
    assert sorted(k for k in registry.objects_for(model_b) if k.startswith("data:")) == [
        "data:b"]
    assert sorted(k for k in registry.objects_for(model_a) if k.startswith("data:")) == [
        "data:a"]
    saved = storage.read(cb_b.last_saved_path).meta["objects"]
    assert "data:b" in saved and "data:a" not in saved
    epochs_a = shuffle_a.epoch
    # Resuming experiment b restores b's counter only.
    resumed_b = make_model()
    resumed_b.fit(dataset(shuffle_b), epochs=1, verbose=0, callbacks=[
        keras_ckpt.ModelCheckpoint(str(tmp_path / "b" / "{epoch}.keras"), resume=True)])
    assert shuffle_a.epoch == epochs_a



def test_two_data_helpers_of_one_name_are_named_and_the_newest_is_claimed(tmp_path):
    """Two `EpochShuffle`s left at the default name in one fit: said at train begin; the
    newest one's state is the one saved, whatever the order a set would give."""
    import warnings

    tf = pytest.importorskip("tensorflow")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("EpochShuffle is a tf.data helper")
    data = tf.data.Dataset.from_tensor_slices((X, Y))
    helpers = [keras_ckpt.data.EpochShuffle(8, seed=seed) for seed in range(5)]
    both = data.apply(helpers[0]).concatenate(data.apply(helpers[-1])).batch(16)
    model = make_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(both, epochs=1, verbose=0, callbacks=[
            keras_ckpt.ModelCheckpoint(str(tmp_path / "{epoch}.keras"))])
    (said,) = [str(w.message) for w in caught if "data helpers named" in str(w.message)]
    assert "5 data helpers named 'train_shuffle'" in said and "name=" in said
    assert registry.objects_for(model)["data:train_shuffle"] is helpers[-1]

# ------------------------------------------------------------------ 12: handlers only record
def test_signal_handlers_only_record(tmp_path):
    """The handlers keras-ckpt installs do no work: no print, no lock release, no restore."""
    seen = {}

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) != 3:
                return
            out, sys.stdout = sys.stdout, io.StringIO()
            sets = []
            original = self.model.set_weights
            self.model.set_weights = lambda w: sets.append(1) or original(w)
            try:
                handler = signal.getsignal(signal.SIGTERM)
                handler(signal.SIGTERM, None)  # first: recorded
                seen["printed"] = sys.stdout.getvalue()
                seen["lock"] = os.path.exists(lock_file(tmp_path))
                interrupt = signal.getsignal(signal.SIGINT)
                try:
                    interrupt(signal.SIGINT, None)  # EarlyStopping restores only when fit closes
                except KeyboardInterrupt:
                    seen["restored_in_handler"] = bool(sets)
                    seen["lock_after_interrupt"] = os.path.exists(lock_file(tmp_path))
                    raise
            finally:
                sys.stdout = out
                del self.model.set_weights

    model = make_model()
    stop = keras_ckpt.EarlyStopping(monitor="loss", restore_best_weights=True,
                                    restore_on_interrupt=True)
    cb = keras_ckpt.ModelCheckpoint(str(tmp_path / "c-{epoch}.keras"), preemption="return",
                                    preemption_signals=["SIGTERM"], verbose=1)
    with pytest.raises(KeyboardInterrupt):
        fit(model, [cb, stop, Probe()], epochs=3)
    assert seen == {"printed": "", "lock": True, "restored_in_handler": False,
                    "lock_after_interrupt": True}
    assert not os.path.exists(lock_file(tmp_path))  # released once the fit closed
    weights = [np.array(w) for w in model.get_weights()]
    assert len(weights) and stop.best_weights is not None
    for a, b in zip(weights, stop.best_weights, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.data inputs")
def test_a_fit_stopped_mid_epoch_leaves_no_garbage_cycle_holding_its_data(tmp_path):
    # Keras leaves it (tests/test_keras_compat.py); a later garbage collection in the
    # user's process would then wait seconds for the iterator's autotuning thread.
    import tensorflow as tf
    from test_keras_compat import StopMidEpoch, tf_iterators_left_by

    data = tf.data.Dataset.from_tensor_slices((X, Y)).batch(8)  # 4 steps an epoch
    checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "c-{epoch}-{batch}.keras"),
                                            save_freq=1)
    left = tf_iterators_left_by(lambda: make_model().fit(
        data, epochs=2, verbose=0, callbacks=[checkpoint, StopMidEpoch(release=False)]))
    assert left == []
    assert os.path.exists(tmp_path / "c-1-2.keras")  # it stopped after step 2


def _watch_reads(monkeypatch) -> list:
    """Weak references to every snapshot read and checked from now on (whole or lazily)."""
    import weakref

    from keras_ckpt import manager

    read = []
    original = manager._checked

    def checked(*args, **kwargs):
        snapshot = original(*args, **kwargs)
        read.append(weakref.ref(snapshot))
        return snapshot

    monkeypatch.setattr(manager, "_checked", checked)
    return read


class _Alive(keras.callbacks.Callback):
    """Records, at each epoch begin and batch end, whether the newest read snapshot lives."""

    def __init__(self, read, alive):
        super().__init__()
        self.read, self.alive = read, alive

    def _record(self, at):
        import gc

        gc.collect()
        self.alive.append((at, self.read[-1]() is not None))

    def on_epoch_begin(self, epoch, logs=None):
        self._record(f"epoch {epoch}")

    def on_train_batch_end(self, batch, logs=None):
        self._record(batch)


def test_a_mid_epoch_resume_starts_the_callbacks_at_the_next_batch_without_the_old_state(
        tmp_path, monkeypatch):
    """The trained batches reach no callback; the checkpoint read is gone by the first step."""

    from test_step_counting import StopAfter

    x, y = make_data(64)
    template = str(tmp_path / "c-{epoch}-{batch}.weights.h5")

    def fit(callbacks):
        return make_model().fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                                callbacks=[keras_ckpt.ModelCheckpoint(
                                    template, save_weights_only=True, resume=True,
                                    save_freq=3), *callbacks])

    with pytest.raises(RuntimeError, match="crash"):
        fit([StopAfter(7)])  # the newest checkpoint: epoch 2, after step 2 of 4
    read, alive = _watch_reads(monkeypatch), []
    fit([_Alive(read, alive)])
    # Batches 0 and 1 were trained before the kill; the state read went with `apply`.
    assert alive == [("epoch 1", False), (2, False), (3, False)]


def test_a_resume_at_an_epoch_end_lets_the_restored_state_go_before_the_first_step(
        tmp_path, monkeypatch):
    import gc


    x, y = make_data(64)
    template = str(tmp_path / "c-{epoch}.weights.h5")

    class CrashAtEpoch2(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("crash")

    def fit(callback):
        return make_model().fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[
            keras_ckpt.ModelCheckpoint(template, save_weights_only=True, resume=True), callback])

    with pytest.raises(RuntimeError, match="crash"):
        fit(CrashAtEpoch2())
    read, alive = _watch_reads(monkeypatch), []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            gc.collect()
            alive.append(read[-1]() is not None)

    fit(Probe())
    assert len(read) == 1 and alive == [False] * 4  # gone before the first new step


def test_a_data_error_while_the_trained_batches_are_skipped_closes_the_fit(tmp_path):
    """Skipping runs outside the step function: its errors still end the session."""
    from test_step_counting import StopAfter

    x, y = make_data(64)

    class Batches(keras.utils.PyDataset):
        def __init__(self, broken=None):
            super().__init__()
            self.broken, self.armed = broken, False  # (armed once the epochs begin)

        def __len__(self):
            return 4

        def __getitem__(self, i):
            if self.armed and i == self.broken:
                raise ValueError(f"unreadable batch {i}")
            return x[16 * i:16 * i + 16], y[16 * i:16 * i + 16]

    class Arm(keras.callbacks.Callback):
        def __init__(self, data):
            super().__init__()
            self.data = data

        def on_epoch_begin(self, epoch, logs=None):
            self.data.armed = True

    def fit(data, callbacks):
        checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "c-{epoch}-{batch}.weights.h5"),
                                                save_weights_only=True, resume=True, save_freq=2)
        return make_model().fit(data, epochs=2, shuffle=False, verbose=0,
                                callbacks=[checkpoint, *callbacks])

    with pytest.raises(RuntimeError, match="crash"):
        fit(Batches(), [StopAfter(7)])  # the newest checkpoint: epoch 2, after step 2 of 4
    before = signal.getsignal(signal.SIGTERM)
    broken = Batches(broken=1)
    with pytest.raises(Exception, match="unreadable batch 1"):  # the last skipped one
        fit(broken, [Arm(broken)])
    assert signal.getsignal(signal.SIGTERM) == before and not os.path.exists(lock_file(tmp_path))
    fit(Batches(), [])  # and the directory is free for the next run


def test_a_resume_from_an_epoch_s_last_step_logs_that_epoch_s_training(tmp_path, monkeypatch):
    """No new step in the epoch: its last call replays (Keras's epoch logs come from it)."""

    x, y = make_data(64)

    class CrashInValidation(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            raise RuntimeError("crash")

    def fit(directory, callbacks):
        checkpoint = keras_ckpt.ModelCheckpoint(str(directory / "c-{epoch}-{batch}.weights.h5"),
                                                save_weights_only=True, resume=True, save_freq=2)
        return make_model().fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                                validation_data=(x, y), callbacks=[checkpoint, *callbacks])

    straight = fit(tmp_path / "straight", [])
    with pytest.raises(RuntimeError, match="crash"):
        fit(tmp_path, [CrashInValidation()])  # the newest checkpoint: epoch 1, its last step
    read, alive = _watch_reads(monkeypatch), []
    resumed = fit(tmp_path, [_Alive(read, alive)])
    assert alive == [("epoch 0", False), (3, False),
                     ("epoch 1", False), (0, False), (1, False), (2, False), (3, False)]
    assert resumed.history == straight.history  # epoch 1's loss too
