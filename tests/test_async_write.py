"""Background writes: same files, in order, one at a time, errors surfaced, committed at exit."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings

import forkserver
import keras
import numpy as np
import pytest
from conftest import make_data, make_model

import keras_ckpt
from keras_ckpt import manager, storage

# Backend-sensitive (tests/test_backends.py runs them on JAX and torch too): all
# of them; the fresh-interpreter run of the last, a check of the fork server's
# exit path (which is the same on every backend), on TensorFlow only.


def fit(model, callbacks, epochs=3):
    x, y = make_data(n=64)
    return model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, shuffle=False,
                     callbacks=callbacks)


class Recorder:
    """Wraps storage.write: records start/end order and threads; can fail chosen writes."""

    def __init__(self, monkeypatch, fail=()):
        self.events, self.threads, self.in_flight, self.most = [], set(), 0, 0
        self.fail, self.calls, self.lock = set(fail), 0, threading.Lock()
        real = storage.write

        def write(path, *args, **kwargs):
            with self.lock:
                self.calls += 1
                call = self.calls
                self.in_flight += 1
                self.most = max(self.most, self.in_flight)
                self.events.append(("start", os.path.basename(path)))
                self.threads.add(threading.current_thread().name)
            try:
                if call in self.fail:
                    raise OSError(28, "No space left on device")
                return real(path, *args, **kwargs)
            finally:
                with self.lock:
                    self.in_flight -= 1
                    self.events.append(("end", os.path.basename(path)))

        monkeypatch.setattr(storage, "write", write)


class StateAtEpochEnd(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.states = {}

    def on_epoch_end(self, epoch, logs=None):
        self.states[epoch] = [v.numpy().copy() for v in self.model.variables]


@pytest.mark.backends
def test_background_files_hold_each_epochs_state_written_in_order_off_the_main_thread(
        tmp_path, monkeypatch):
    recorder = Recorder(monkeypatch)
    seen = StateAtEpochEnd()
    model = make_model(seed=3, dropout=0.2, batchnorm=True)
    checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "e{epoch}.weights.h5"),
                                            save_weights_only=True, async_write=True)
    fit(model, [seen, checkpoint], epochs=4)
    assert recorder.most == 1  # never two writes at once
    assert recorder.events == [(kind, f"e{e}.weights.h5") for e in range(1, 5)
                               for kind in ("start", "end")]
    assert recorder.threads == {"keras-ckpt-writer"}
    # Each file holds the state at its epoch's end, though training went on
    # while it was written (the snapshot is not a copy on TensorFlow).
    for epoch in range(4):
        snapshot = storage.read(str(tmp_path / f"e{epoch + 1}.weights.h5"))
        for i, value in enumerate(seen.states[epoch]):
            np.testing.assert_array_equal(snapshot.arrays[f"model/{i:05d}"], value)
    # And a resume from them is what a synchronous run's would be.
    sync_dir = tmp_path / "sync"
    fit(make_model(seed=3, dropout=0.2, batchnorm=True),
        [keras_ckpt.ModelCheckpoint(str(sync_dir / "e{epoch}.weights.h5"),
                                    save_weights_only=True)], epochs=4)
    a, b = storage.read(str(tmp_path / "e4.weights.h5")), storage.read(str(sync_dir /
                                                                           "e4.weights.h5"))
    for name in a.arrays:
        if not name.startswith("rng/"):
            np.testing.assert_array_equal(a.arrays[name], b.arrays[name], err_msg=name)


@pytest.mark.backends
def test_a_failed_background_write_is_reported_at_the_next_save(tmp_path, monkeypatch):
    Recorder(monkeypatch, fail={2})
    checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), async_write=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(make_model(), [checkpoint], epochs=3)
    failed = [str(w.message) for w in caught if "FAILED" in str(w.message)]
    assert len(failed) == 1 and "e2.keras" in failed[0] and "No space" in failed[0]
    assert checkpoint.save_errors and "e2.keras" in checkpoint.save_errors[0]
    assert sorted(os.listdir(tmp_path)) == ["e1.keras", "e3.keras"]  # no junk, the rest intact
    assert [c.epoch for c in manager.list_checkpoints(tmp_path)] == [0, 2]


@pytest.mark.backends
def test_a_failed_last_background_write_raises_at_train_end(tmp_path, monkeypatch):
    Recorder(monkeypatch, fail={3})
    model = make_model()
    checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), async_write=True,
                                            on_save_error="raise")
    with pytest.raises(OSError, match="No space"):
        fit(model, [checkpoint], epochs=3)
    assert int(model.optimizer.iterations.numpy()) == 12  # all trained; raised at the end
    assert sorted(os.listdir(tmp_path)) == ["e1.keras", "e2.keras"]


CHILD = r"""
import os, sys, threading
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras, numpy as np, keras_ckpt
import keras_ckpt.fit.session
from keras_ckpt.writer import BackgroundWriter
from keras_ckpt import storage

directory, log = sys.argv[1], open(sys.argv[2], "a")


def note(event):
    log.write(event + "\n")
    log.flush()


# The epoch-2 write is held until the fit, ending with the error, waits for the writer
# (its session drains it), or else until the error reaches the top (sys.excepthook):
# it is still in flight when the error is raised, whatever the machine's speed.
release, write = threading.Event(), storage.write
close, drain = keras_ckpt.fit.session.FitSession.close, BackgroundWriter.drain
closing = []


def on_close(self, error=None):
    if error is not None and not self.closed:
        closing.append(error)
    return close(self, error)


def on_drain(self, *args, **kwargs):
    if closing and not release.is_set():  # the fit ends with the error: it waits here
        note("fit waits for the writer")
        release.set()
    return drain(self, *args, **kwargs)


keras_ckpt.fit.session.FitSession.close = on_close
BackgroundWriter.drain = on_drain


def held(path, *args, **kwargs):
    name = os.path.basename(path)
    if name == "e2.weights.h5":
        note("write e2 held")
        if not release.wait(timeout=120):
            note("write e2 never released")
    result = write(path, *args, **kwargs)
    note(f"write {name} done")
    return result


storage.write = held


def excepthook(kind, value, tb):
    note(f"uncaught {kind.__name__}")
    release.set()
    sys.__excepthook__(kind, value, tb)


sys.excepthook = excepthook


class Boom(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            on_disk = os.path.exists(os.path.join(directory, "e2.weights.h5"))
            note(f"raise, e2 on disk: {on_disk}")
            raise RuntimeError("a later callback fails")

# Small: the write of epoch 2 is held on `release`, not made slow by its size.
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(1)])
model.compile("adam", "mse")
x = np.ones((32, 8), "float32")
checkpoint = keras_ckpt.ModelCheckpoint(os.path.join(directory, "e{epoch}.weights.h5"),
                                        save_weights_only=True, async_write=True)
model.fit(x, x[:, :1], epochs=3, verbose=0, callbacks=[checkpoint, Boom()])
"""


@pytest.mark.slow
@pytest.mark.parametrize("start", [pytest.param("forked", marks=pytest.mark.backends), "fresh"])
def test_the_write_in_flight_commits_when_an_exception_ends_the_process(tmp_path, start):
    # Also run as a fresh interpreter: the fork server's children end the way
    # python does (threads joined, then atexit), and this is the test of that.
    spawn = forkserver.run if start == "forked" else subprocess.run
    log = tmp_path / "events.log"
    proc = spawn([sys.executable, "-c", CHILD, str(tmp_path), str(log)], capture_output=True,
                 text=True, timeout=300)
    assert proc.returncode == 1 and "a later callback fails" in proc.stderr, proc.stderr[-3000:]
    events = log.read_text().splitlines()
    # The epoch-2 save was handed to the writer before the error and held
    # there: the error was raised with the write in flight (not on disk); the
    # fit, closing on the error, waited for it; the write completed before the
    # error left fit and reached the top. (Where the writer thread reaches the
    # hold, before or after the error, varies.)
    assert events[0] == "write e1.weights.h5 done" and len(events) == 6, events
    assert "write e2 held" in events, events
    order = [events.index(e) for e in ("raise, e2 on disk: False", "fit waits for the writer",
                                       "write e2.weights.h5 done", "uncaught RuntimeError")]
    assert order == sorted(order), events
    # It is complete and verifies, and no temporary file is left.
    assert sorted(os.listdir(tmp_path)) == ["e1.weights.h5", "e2.weights.h5", "events.log"]
    snapshot = storage.read(str(tmp_path / "e2.weights.h5"))
    assert snapshot.meta["progress"]["epoch"] == 1


@pytest.mark.backends
def test_background_copies_reuse_one_set_of_buffers_and_wait_for_the_write_before_it(
        tmp_path, monkeypatch):
    """Where a later step would change a view (torch; forced here on every backend), a
    background save copies the state: into the same buffers every save, never before the
    write of the previous save is done, and let go when the fit ends."""
    from keras_ckpt import state as state_lib
    from keras_ckpt.writer import BackgroundWriter

    monkeypatch.setattr(state_lib, "view_is_stable", lambda: False)
    # Each write is held until the training thread waits for it: a save that copied
    # into the buffers before waiting would overwrite what the write in flight holds.
    gate, real_write, real_wait = threading.Event(), storage.write, BackgroundWriter.wait

    def held_write(*args, **kwargs):
        assert gate.wait(60), "the training thread never waited for the write"
        gate.clear()
        return real_write(*args, **kwargs)

    def wait(self):
        if self.in_flight:
            gate.set()
        return real_wait(self)

    monkeypatch.setattr(storage, "write", held_write)
    monkeypatch.setattr(BackgroundWriter, "wait", wait)
    seen = StateAtEpochEnd()
    checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "e{epoch}.weights.h5"),
                                            save_weights_only=True, async_write=True)
    addresses = []

    class Buffers(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):  # after the checkpoint's save
            buffers = checkpoint.saver.buffers
            addresses.append({k: v.__array_interface__["data"][0] for k, v in buffers.items()})

    fit(make_model(seed=3, dropout=0.2, batchnorm=True), [seen, checkpoint, Buffers()],
        epochs=4)
    assert len(addresses) == 4 and len(addresses[0]) >= 10
    assert all(a == addresses[0] for a in addresses)  # the same buffers every save
    assert checkpoint.saver.buffers is None  # let go at the end of the fit
    for epoch in range(4):  # and each file holds its own epoch's state
        snapshot = storage.read(str(tmp_path / f"e{epoch + 1}.weights.h5"))
        for i, value in enumerate(seen.states[epoch]):
            np.testing.assert_array_equal(snapshot.arrays[f"model/{i:05d}"], value)
