"""ModelCheckpoint: full state, Keras parity, crash-safe writes, retention, bad input."""

from __future__ import annotations

import hashlib
import math
import os

import h5py
import keras
import numpy as np
import pytest
from conftest import make_data, make_model, needs_steps_per_execution
from keras.src.utils import python_utils

import keras_ckpt
from keras_ckpt import storage
from keras_ckpt.state import StateMismatchError


def all_state(model):
    return [v.numpy() for v in model.variables] + [v.numpy() for v in model.optimizer.variables]


def assert_same_state(a, b):
    sa, sb = all_state(a), all_state(b)
    assert len(sa) == len(sb)
    for x, y in zip(sa, sb, strict=True):
        np.testing.assert_array_equal(x, y)


def fit(model, callbacks, epochs=2, validation=True, **kw):
    x, y = make_data(48)
    extra = {"validation_data": (x[:16], y[:16])} if validation else {}
    return model.fit(x, y, batch_size=8, epochs=epochs, callbacks=callbacks, verbose=0,
                     **extra, **kw)


# ------------------------------------------------------------------ full state
def test_checkpoint_holds_every_variable_including_seed_generator_and_lr(tmp_path):
    model = make_model(dropout=0.3, batchnorm=True, optimizer=keras.optimizers.Adam(0.05))
    reduce = keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0,
                                               min_delta=1e9)
    fit(model, [reduce, keras_ckpt.ModelCheckpoint(str(tmp_path / "c.keras"))], epochs=2)
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(0.025)
    fresh = make_model(dropout=0.3, batchnorm=True, optimizer=keras.optimizers.Adam(0.05), seed=9)
    info = keras_ckpt.restore(fresh, tmp_path / "c.keras")
    assert_same_state(model, fresh)  # seed generator, BN statistics, lr, iterations, slots
    assert float(fresh.optimizer.learning_rate.numpy()) == pytest.approx(0.025)
    assert int(fresh.optimizer.iterations.numpy()) == 12
    assert info.resume_point == (2, 0)
    seed_paths = [v.path for v in model.variables if "seed_generator" in v.path]
    assert seed_paths and not any("seed" in v.path for v in model.weights)  # save_weights skips it


def test_keras_reads_what_we_write(tmp_path):
    model = make_model(batchnorm=True)
    fit(model, [keras_ckpt.ModelCheckpoint(str(tmp_path / "w.weights.h5"), save_weights_only=True),
                keras_ckpt.ModelCheckpoint(str(tmp_path / "m.keras"))], epochs=1)
    other = make_model(batchnorm=True, seed=3)
    other.load_weights(tmp_path / "w.weights.h5")
    for a, b in zip(model.weights, other.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    x, _ = make_data(8)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize("kwargs", [
    {},
    {"save_best_only": True, "monitor": "val_loss"},
    {"save_freq": 3},
    {"save_weights_only": True},
])
def test_default_file_names_and_save_moments_match_keras(tmp_path, kwargs):
    ext = ".weights.h5" if kwargs.get("save_weights_only") else ".keras"
    name = ("b{epoch:02d}-{batch}" if "save_freq" in kwargs else "e{epoch:02d}-{val_loss:.3f}")
    ours, theirs = tmp_path / "ours", tmp_path / "keras"
    for directory, cls in ((ours, keras_ckpt.ModelCheckpoint),
                           (theirs, keras.callbacks.ModelCheckpoint)):
        model = make_model(seed=1)
        fit(model, [cls(str(directory / (name + ext)), **kwargs)], epochs=3)
    assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs))
    assert os.listdir(ours)


def test_save_best_only_with_integer_save_freq_saves_repeatedly(tmp_path):
    # Keras 3.15 raises TypeError on the second save here.
    cb = keras_ckpt.ModelCheckpoint(str(tmp_path / "b-{epoch}-{batch}.keras"), monitor="loss",
                                    save_best_only=True, save_freq=2)
    fit(make_model(), [cb], epochs=2)
    assert len(os.listdir(tmp_path)) >= 2
    assert cb.best is not None and math.isfinite(cb.best)


@needs_steps_per_execution
def test_steps_per_execution_counts_steps_not_hook_calls(tmp_path):
    model = make_model()
    model.compile(optimizer="adam", loss="mse", steps_per_execution=2)
    cb = keras_ckpt.ModelCheckpoint(str(tmp_path / "s-{epoch}-{batch}.keras"), save_freq=3)
    fit(model, [cb], epochs=2)  # 6 steps an epoch; hooks fire after steps 2, 4, 6
    steps = sorted(keras_ckpt.list_checkpoints(tmp_path), key=lambda c: c.global_step)
    assert [c.global_step for c in steps] == [4, 8, 12]
    assert all(c.global_step - b.global_step >= 3 for b, c in zip(steps, steps[1:], strict=False))


def test_no_batch_hook_unless_asked():
    epoch = keras_ckpt.ModelCheckpoint("c/{epoch}.keras")
    assert python_utils.is_default(epoch.on_train_batch_end)
    assert not python_utils.is_default(
        keras_ckpt.ModelCheckpoint("c/{epoch}.keras", save_freq=5).on_train_batch_end)
    assert not python_utils.is_default(
        keras_ckpt.ModelCheckpoint("c/{epoch}.keras", save_interval=60).on_train_batch_end)


# ------------------------------------------------------------------ resume
def test_best_survives_resume(tmp_path):
    path = str(tmp_path / "best.keras")
    cb = keras_ckpt.ModelCheckpoint(path, monitor="val_loss", save_best_only=True, save_last=True)
    fit(make_model(), [cb], epochs=3)
    best = cb.best
    again = keras_ckpt.ModelCheckpoint(path, monitor="val_loss", save_best_only=True,
                                       save_last=True, resume=True)
    assert again.best is None
    model = make_model()
    model.compile(optimizer=keras.optimizers.Adam(0.0), loss="mse")  # cannot improve
    fit(model, [again], epochs=3, initial_epoch=0)
    assert again.best == best
    assert again.resumed_from is not None and again.resumed_from.epoch == 2


def test_resume_from_a_chosen_checkpoint_into_a_new_directory(tmp_path):
    old = tmp_path / "run1"
    fit(make_model(), [keras_ckpt.ModelCheckpoint(str(old / "e{epoch}.keras"))], epochs=3)
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in old.iterdir()}
    new = tmp_path / "run2"
    cb = keras_ckpt.ModelCheckpoint(str(new / "e{epoch}.keras"), resume=str(old / "e1.keras"))
    history = fit(make_model(), [cb], epochs=3)
    assert history.epoch == [0, 1, 2] and len(history.history["loss"]) == 3
    assert sorted(os.listdir(new)) == ["e2.keras", "e3.keras"]
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in old.iterdir()} == digest


def test_resume_with_nothing_saved_starts_from_scratch(tmp_path):
    cb = keras_ckpt.ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), resume=True)
    history = fit(make_model(), [cb], epochs=2)
    assert history.epoch == [0, 1] and cb.resumed_from is None


def test_resume_of_a_finished_run_trains_nothing(tmp_path):
    path = str(tmp_path / "e{epoch}.keras")
    fit(make_model(), [keras_ckpt.ModelCheckpoint(path)], epochs=2)
    model = make_model()
    fit(model, [keras_ckpt.ModelCheckpoint(path, resume=True)], epochs=2)
    assert int(model.optimizer.iterations.numpy()) == 12  # restored, not trained further
    # The next plain fit on this model starts at epoch 0 again.
    assert len(fit(model, [], epochs=1).epoch) == 1


def test_non_finite_state_is_never_saved_or_resumed(tmp_path):
    x, y = make_data(48)
    y_bad = y.copy()
    model = make_model()
    cb = keras_ckpt.ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), monitor="loss")
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[cb], verbose=0)
    y_bad[:] = np.inf
    with pytest.warns(UserWarning, match="not finite"):
        model.fit(x, y_bad, batch_size=8, epochs=2, initial_epoch=1, callbacks=[cb], verbose=0)
    assert sorted(os.listdir(tmp_path)) == ["e1.keras"]
    info, _ = keras_ckpt.latest_checkpoint(tmp_path)
    assert info.path.endswith("e1.keras") and info.finite


# ------------------------------------------------------------------ retention
def test_retention_policies_compose(tmp_path):
    cb = keras_ckpt.ModelCheckpoint(
        str(tmp_path / "e{epoch:02d}.keras"), monitor="val_loss",
        retention=[keras_ckpt.KeepLast(2), keras_ckpt.KeepBest(1), keras_ckpt.KeepEvery(epochs=3)])
    fit(make_model(), [cb], epochs=7)
    infos = keras_ckpt.list_checkpoints(tmp_path)
    names = {os.path.basename(c.path) for c in infos}
    assert {"e06.keras", "e07.keras", "e03.keras"} <= names
    best = min(infos, key=lambda c: c.monitor_value)
    assert os.path.basename(best.path) in names
    assert len(names) <= 5


def test_keep_every_interval_uses_write_times():
    class C:
        def __init__(self, path, t):
            self.path, self.written_at = path, t

    cs = [C(str(i), t) for i, t in enumerate([0, 10, 61, 70, 130])]
    assert keras_ckpt.KeepEvery(interval=60).keep(cs) == {"0", "2", "4"}


def test_save_interval_uses_the_injected_clock(tmp_path):
    now = [0.0]

    class Tick(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            now[0] += 10.0

    cb = keras_ckpt.ModelCheckpoint(str(tmp_path / "t-{epoch}-{batch}.keras"), save_freq=10**6,
                                    save_interval=25, clock=lambda: now[0])
    fit(make_model(), [Tick(), cb], epochs=1)  # 6 steps, 10 s each: saves at 30 s and 60 s
    assert sorted(os.listdir(tmp_path)) == ["t-1-3.keras", "t-1-6.keras"]


def test_save_last_links_the_newest_state(tmp_path):
    cb = keras_ckpt.ModelCheckpoint(str(tmp_path / "best.keras"), monitor="val_loss",
                                    save_best_only=True, save_last=True)
    fit(make_model(), [cb], epochs=3)
    last = keras_ckpt.list_checkpoints(tmp_path)[-1]
    assert os.path.basename(last.path) in ("last.keras", "best.keras") and last.epoch == 2
    assert keras_ckpt.latest_checkpoint(tmp_path)[0].epoch == 2


# ------------------------------------------------------------------ crash safety
def test_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "c.keras")
    model = make_model()
    fit(model, [keras_ckpt.ModelCheckpoint(path)], epochs=1)
    before = open(path, "rb").read()

    def broken(p):
        with open(p, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    snapshot = keras_ckpt.state.capture(model)
    with pytest.raises(OSError, match="No space"):
        storage.write(path, snapshot, keras_writer=broken)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["c.keras"]


def test_partial_and_corrupt_files_are_never_loaded(tmp_path):
    fit(make_model(), [keras_ckpt.ModelCheckpoint(str(tmp_path / "e{epoch}.keras"))], epochs=2)
    # A write in progress (hidden temporary name) is not listed.
    (tmp_path / ".e3.keras.tmp-1-abcd.keras").write_bytes(b"partial")
    # A damaged newest file is skipped with a warning naming it.
    data = bytearray((tmp_path / "e2.keras").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "e2.keras").write_bytes(bytes(data))
    listed = [os.path.basename(c.path) for c in keras_ckpt.list_checkpoints(tmp_path)]
    assert listed[0] == "e1.keras" and not any(n.startswith(".") for n in listed)
    with pytest.warns(UserWarning, match="e2.keras"):
        info, _ = keras_ckpt.latest_checkpoint(tmp_path)
    assert info.path.endswith("e1.keras")


def test_a_flipped_bit_in_an_array_fails_its_checksum(tmp_path):
    path = tmp_path / "w.weights.h5"
    fit(make_model(), [keras_ckpt.ModelCheckpoint(str(path), save_weights_only=True)], epochs=1)
    with h5py.File(path, "a") as f:
        arr = f["keras_ckpt/arrays/a00000"]
        values = arr[()]
        values.flat[0] = np.nextafter(values.flat[0], np.inf)
        arr[...] = values
    with pytest.raises(keras_ckpt.CorruptCheckpointError, match="checksum"):
        storage.read(str(path))


def test_foreign_files_are_refused(tmp_path):
    model = make_model()
    fit(model, [keras.callbacks.ModelCheckpoint(str(tmp_path / "k.keras"))], epochs=1)
    with pytest.raises(keras_ckpt.CorruptCheckpointError, match="without keras-ckpt"):
        keras_ckpt.restore(model, tmp_path / "k.keras")
    assert keras_ckpt.list_checkpoints(tmp_path) == []


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, error, match", [
    ({"filepath": "c/{epoch.x}.keras"}, ValueError, "placeholder"),
    ({"filepath": "c/{epoch.keras"}, ValueError, "not a valid format string"),
    ({"filepath": "c/e.h5", "save_weights_only": True}, ValueError, "`.weights.h5`"),
    ({"filepath": "c/e.ckpt"}, ValueError, "must end in `.keras`"),
    ({"filepath": "c/e.keras", "save_freq": "batch"}, ValueError, "`save_freq`"),
    ({"filepath": "c/e.keras", "save_freq": 0}, ValueError, "`save_freq` must be >= 1"),
    ({"filepath": "c/e.keras", "retention": [3]}, TypeError, "`retention`"),
    ({"filepath": "c/e.keras", "save_interval": -1}, ValueError, "`save_interval`"),
    ({"filepath": "c/e.keras", "resume": "nope.keras"}, FileNotFoundError, "`resume`"),
    ({"filepath": 5}, TypeError, "`filepath`"),
])
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        keras_ckpt.ModelCheckpoint(**kwargs)


def test_unknown_mode_warns_and_falls_back_to_auto_as_keras_does(tmp_path):
    with pytest.warns(UserWarning, match="ModelCheckpoint mode 'bigger' is unknown, fallback to"):
        cb = keras_ckpt.ModelCheckpoint(str(tmp_path / "e.keras"), mode="bigger",
                                        save_best_only=True)
    assert cb.mode == "auto" and cb.get_config()["mode"] == "auto"
    model = make_model()
    fit(model, [cb], epochs=1)
    assert cb.monitor_op is keras.ops.less and (tmp_path / "e.keras").exists()
    cb.best = 0.5
    assert cb.best == 0.5 and cb._monitor.best == 0.5


def test_an_unrecognized_save_freq_says_so_in_keras_words():
    with pytest.raises(ValueError, match="Unrecognized save_freq"):
        keras_ckpt.ModelCheckpoint("c/e.keras", save_freq="batch")


def test_integer_save_freq_counts_from_the_callback_s_first_fit(tmp_path):
    # Keras counts the batches a callback has seen since its last save, across
    # its fits: a model trained before does not make the first step "due".
    model = make_model()
    fit(model, [], epochs=1, validation=False)  # 6 steps an epoch
    cb = keras_ckpt.ModelCheckpoint(str(tmp_path / "s-{epoch}-{batch}.keras"), save_freq=5)
    fit(model, [cb], epochs=2, validation=False)
    assert sorted(os.listdir(tmp_path)) == ["s-1-5.keras", "s-2-4.keras"]
    fit(model, [cb], epochs=1, validation=False)  # 2 steps left over from the last fit
    assert sorted(os.listdir(tmp_path)) == ["s-1-3.keras", "s-1-5.keras", "s-2-4.keras"]


def test_unknown_placeholder_fails_after_the_first_step(tmp_path):
    model = make_model()
    cb = keras_ckpt.ModelCheckpoint(str(tmp_path / "{epoch}-{val_acc:.2f}.keras"))
    with pytest.raises(ValueError, match=r"\{val_acc\}.*available: epoch, batch, loss"):
        fit(model, [cb], epochs=2)
    assert int(model.optimizer.iterations.numpy()) == 1 and not os.listdir(tmp_path)


def test_unwritable_directory_and_directory_filepath_fail_at_train_begin(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    model = make_model()
    with pytest.raises(PermissionError, match="cannot write"):
        fit(model, [keras_ckpt.ModelCheckpoint(str(blocker / "e{epoch}.keras"))], epochs=1)
    (tmp_path / "dir.keras").mkdir()
    with pytest.raises(IsADirectoryError, match="directory"):
        fit(model, [keras_ckpt.ModelCheckpoint(str(tmp_path / "dir.keras"))], epochs=1)
    assert int(model.optimizer.iterations.numpy()) == 0


def test_resume_into_a_different_model_names_the_first_variable(tmp_path):
    path = str(tmp_path / "e{epoch}.keras")
    fit(make_model(), [keras_ckpt.ModelCheckpoint(path)], epochs=1)
    wider = keras.Sequential([keras.Input((4,)), keras.layers.Dense(9, activation="relu"),
                              keras.layers.Dense(1)])
    wider.compile(keras.optimizers.Adam(0.01), "mse")
    expected = r"model variable 0 is .*kernel \(4, 8\).*\(4, 9\)"
    with pytest.raises(StateMismatchError, match=expected):
        fit(wider, [keras_ckpt.ModelCheckpoint(path, resume=True)], epochs=2)
    assert int(wider.optimizer.iterations.numpy()) == 0


def test_another_models_newer_checkpoint_is_skipped_loudly(tmp_path):
    """Resume falls back past a file of another model, warning; with none that fits, it raises."""
    path = str(tmp_path / "e{epoch}.keras")
    model = make_model()
    fit(model, [keras_ckpt.ModelCheckpoint(path)], epochs=1)
    expected = [v.numpy().copy() for v in model.variables]
    wider = keras.Sequential([keras.Input((4,)), keras.layers.Dense(9), keras.layers.Dense(1)])
    wider.compile(keras.optimizers.Adam(0.01), "mse")
    fit(wider, [keras_ckpt.ModelCheckpoint(str(tmp_path / "x{epoch}.keras"))], epochs=1)
    os.replace(tmp_path / "x1.keras", tmp_path / "e2.keras")  # newer, of another model
    resumed, probe = make_model(), keras_ckpt.ModelCheckpoint(path, resume=True)
    with pytest.warns(UserWarning, match=r"another model.*e2\.keras.*\(4, 9\)"):
        fit(resumed, [probe], epochs=1)
    assert probe.resumed_from.path.endswith("e1.keras")
    for a, v in zip(expected, resumed.variables, strict=True):
        np.testing.assert_array_equal(a, v.numpy())
    os.remove(tmp_path / "e1.keras")
    with pytest.raises(StateMismatchError, match=r"e2\.keras.*\(4, 9\)"):
        fit(make_model(), [keras_ckpt.ModelCheckpoint(path, resume=True)], epochs=2)


def test_resume_with_a_different_optimizer_is_refused(tmp_path):
    path = str(tmp_path / "e{epoch}.keras")
    fit(make_model(), [keras_ckpt.ModelCheckpoint(path)], epochs=1)
    sgd = make_model(optimizer=keras.optimizers.SGD())
    with pytest.raises(StateMismatchError, match="optimizer Adam.*compiled with SGD"):
        fit(sgd, [keras_ckpt.ModelCheckpoint(path, resume=True)], epochs=2)
    keras_ckpt.restore(sgd, keras_ckpt.list_checkpoints(tmp_path)[-1].path, weights_only=True)


def test_restore_into_an_unbuilt_model_says_how(tmp_path):
    path = str(tmp_path / "e.keras")
    fit(make_model(), [keras_ckpt.ModelCheckpoint(path)], epochs=1)
    unbuilt = keras.Sequential([keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
    unbuilt.compile("adam", "mse")
    with pytest.raises(ValueError, match=r"not built.*model.build"):
        keras_ckpt.restore(unbuilt, path)
    unbuilt.build((None, 4))
    keras_ckpt.restore(unbuilt, path)


def test_get_config_reports_the_arguments():
    cb = keras_ckpt.ModelCheckpoint("c/{epoch}.keras", save_freq=3, resume=True)
    config = cb.get_config()
    assert config["save_freq"] == 3 and config["resume"] is True
    assert config["monitor"] == "val_loss" and config["save_best_only"] is False


def test_legacy_h5_full_model_is_readable_by_keras_and_resumable(tmp_path):
    path = str(tmp_path / "m{epoch}.h5")
    model = make_model()
    fit(model, [keras_ckpt.ModelCheckpoint(path)], epochs=2)
    loaded = keras.saving.load_model(tmp_path / "m2.h5", compile=False)
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    resumed = make_model()
    fit(resumed, [keras_ckpt.ModelCheckpoint(path, resume=True)], epochs=2)
    assert_same_state(model, resumed)


@pytest.mark.parametrize("ext", [".weights.h5", ".keras"])
def test_no_save_copies_the_state_not_even_a_process_s_first(tmp_path, ext):
    """The first save learns Keras's layout without the optimizer's `.numpy()` copies, and a
    `.keras` archive streams its HDF5 member from disk instead of building it in memory."""
    import tracemalloc

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((512,))] + [keras.layers.Dense(512) for _ in range(4)])
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    x = np.zeros((8, 512), "float32")
    model.fit(x, x, verbose=0)  # built, the optimizer's slots too
    state = sum(v.numpy().nbytes for v in model.variables + model.optimizer.variables)
    peaks = []

    class Around(keras.callbacks.Callback):
        def __init__(self, start):
            super().__init__()
            self.start = start

        def on_epoch_end(self, epoch, logs=None):
            if self.start:
                tracemalloc.start()
            else:
                peaks.append(tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()

    checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / f"c-{{epoch}}{ext}"),
                                            save_weights_only=ext == ".weights.h5")
    model.fit(x, x, epochs=2, verbose=0, callbacks=[Around(True), checkpoint, Around(False)])
    assert len(os.listdir(tmp_path)) == 2 and state > 12 * 2**20
    assert max(peaks) < 0.05 * state, [p / state for p in peaks]  # first and second save


@pytest.mark.parametrize("ext", [".weights.h5", ".keras"])
def test_restore_and_resume_hold_one_variable_at_a_time_not_a_copy_of_the_state(tmp_path, ext):
    """Every checksum passes before anything is assigned (a read holds two arrays at most),
    then each array is read again as it is assigned: never the whole state in memory."""
    import tracemalloc

    def build(seed):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((512,))] +
                                 [keras.layers.Dense(512) for _ in range(16)])
        model.compile(keras.optimizers.Adam(1e-3), "mse")
        return model

    x = np.ones((8, 512), "float32")
    model = build(0)
    path = str(tmp_path / f"c{ext}")
    model.fit(x, x, epochs=2, verbose=0, callbacks=[keras_ckpt.ModelCheckpoint(
        path, save_weights_only=ext == ".weights.h5")])
    state = sum(v.numpy().nbytes for v in model.variables + model.optimizer.variables)
    largest = max(v.numpy().nbytes for v in model.variables)
    assert state > 40 * largest  # so a whole copy would show (fixed costs: a 1 MiB buffer)

    restored = build(1)
    restored.optimizer.build(restored.trainable_variables)
    tracemalloc.start()
    keras_ckpt.restore(restored, path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert_same_state(model, restored)
    assert peak < 0.15 * state, peak / state

    peaks = []

    class Measured(keras.callbacks.Callback):  # from before the checkpoint's train begin
        def on_train_begin(self, logs=None):
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()

    resumed = build(2)
    tracemalloc.start()
    resumed.fit(x, x, epochs=2, verbose=0, callbacks=[keras_ckpt.ModelCheckpoint(
        path, save_weights_only=ext == ".weights.h5", resume=True), Measured()])
    assert resumed.optimizer.iterations.numpy() == model.optimizer.iterations.numpy()
    assert_same_state(model, resumed)
    assert peaks and peaks[0] < 0.15 * state, peaks[0] / state
