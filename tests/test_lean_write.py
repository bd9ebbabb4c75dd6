"""The lean write: Keras's `.weights.h5` layout written from the snapshot, data stored once."""

from __future__ import annotations

import h5py
import keras
import numpy as np
import pytest
from conftest import make_data, make_model

import keras_ckpt
from keras_ckpt import keras_layout, storage
from keras_ckpt import state as state_lib

# Backend-sensitive: tests/test_backends.py runs this file's tests on JAX and torch too.
pytestmark = pytest.mark.backends


def fit(model, callbacks=(), epochs=1):
    x, y = make_data(n=32)
    model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, callbacks=list(callbacks))


def structure(path):
    """Every group and dataset outside our group, with its attributes and values."""
    found = {}
    with h5py.File(path, "r") as f:
        def visit(name):  # by link: a dataset shared with our group has two names
            if name == "keras_ckpt" or name.startswith("keras_ckpt/"):
                return
            obj = f[name]
            value = obj[()] if isinstance(obj, h5py.Dataset) else None
            found[name] = (type(obj).__name__, dict(obj.attrs), value)
        f.visit_links(visit)
    return found


def test_our_weights_file_has_exactly_keras_layout_and_loads_in_keras(tmp_path):
    model = make_model(batchnorm=True, dropout=0.2, metrics=["mae"])
    fit(model)
    ours, theirs = tmp_path / "ours.weights.h5", tmp_path / "theirs.weights.h5"
    checkpoint = keras_ckpt.ModelCheckpoint(str(ours), save_weights_only=True)
    fit(model, [checkpoint])
    model.save_weights(theirs)
    a, b = structure(ours), structure(theirs)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][:2] == b[name][:2], name
        if a[name][2] is not None:
            np.testing.assert_array_equal(a[name][2], b[name][2], err_msg=name)
    fresh = make_model(batchnorm=True, dropout=0.2, metrics=["mae"], seed=9)
    fit(fresh)  # build the optimizer, so Keras loads its variables too
    fresh.load_weights(ours)
    for v, w in zip(model.weights + model.optimizer.variables,
                    fresh.weights + fresh.optimizer.variables, strict=True):
        np.testing.assert_array_equal(v.numpy(), w.numpy(), err_msg=v.path)


def test_each_variable_is_stored_once_and_damage_to_keras_part_is_detected(tmp_path):
    model = make_model()
    path = tmp_path / "w.weights.h5"
    fit(model, [keras_ckpt.ModelCheckpoint(str(path), save_weights_only=True)])
    with h5py.File(path, "r") as f:
        meta = storage.read_meta(str(path))
        index = meta["arrays"]
        kernel = f["keras_ckpt/arrays/" + index["model/00000"]["dataset"]]
        assert kernel.id.get_offset() == f["layers/dense/vars/0"].id.get_offset()
        slot = f["keras_ckpt/arrays/" + index["optimizer/00002"]["dataset"]]
        assert slot.id.get_offset() == f["optimizer/vars/2"].id.get_offset()
        assert "keras_part_crc32" not in meta  # nothing of Keras's is outside our checksums
    with h5py.File(path, "a") as f:
        values = f["layers/dense/vars/0"][()]
        values.flat[3] = np.nextafter(values.flat[3], np.inf)
        f["layers/dense/vars/0"][...] = values
    with pytest.raises(keras_ckpt.CorruptCheckpointError, match="model/00000.*checksum"):
        storage.read(str(path))


@keras.saving.register_keras_serializable(package="tests")
class Computed(keras.layers.Layer):
    """Stores a computed array (not its variable) the way some Keras layers do."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], 1), initializer="ones")

    def call(self, x):
        return x @ self.w

    def save_own_variables(self, store):
        store["0"] = keras.ops.convert_to_numpy(self.w) * 1.0

    def load_own_variables(self, store):
        self.w.assign(store["0"])


def test_a_layer_storing_a_computed_array_keeps_its_value_and_checksum(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), Computed()])
    model.compile("adam", "mse")
    fit(model)
    names = {id(v): f"model/{i:05d}" for i, v in enumerate(model.variables)}
    names.update({id(v): f"optimizer/{i:05d}" for i, v in enumerate(model.optimizer.variables)})
    layout = keras_layout.layout(model, names)
    computed = [e for e in layout.entries if e.array is None]
    assert [e.group for e in computed] == ["layers/computed/vars"]
    path = tmp_path / "c.weights.h5"
    fit(model, [keras_ckpt.ModelCheckpoint(str(path), save_weights_only=True)])
    assert list(storage.read_meta(str(path))["keras_part_crc32"]) == ["layers/computed/vars/0"]
    fresh = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), Computed()])
    fresh.compile("adam", "mse")
    fresh.load_weights(path)
    np.testing.assert_array_equal(fresh.layers[-1].w.numpy(), model.layers[-1].w.numpy())
    with h5py.File(path, "a") as f:
        f["layers/computed/vars/0"][0, 0] = 5.0
    with pytest.raises(keras_ckpt.CorruptCheckpointError, match="computed"):
        storage.read(str(path))


def test_a_snapshot_read_without_copies_is_not_changed_by_later_steps():
    # On this backend the no-copy read must stay what it was when later steps
    # assign the variables; if it did not, snapshots would have to copy.
    model = make_model(batchnorm=True, dropout=0.3)
    fit(model)
    view = state_lib.capture(model, copy=False)
    copied = state_lib.capture(model, copy=True)
    fit(model, epochs=2)
    assert not np.array_equal(model.variables[0].numpy(), copied.arrays["model/00000"])
    for name, array in copied.arrays.items():
        np.testing.assert_array_equal(view.arrays[name], array, err_msg=name)


def test_one_pass_keras_archive_loads_in_keras_with_the_state_inside(tmp_path):
    import zipfile

    model = make_model(batchnorm=True, metrics=["mae"])
    path = tmp_path / "m.keras"
    fit(model, [keras_ckpt.ModelCheckpoint(str(path))])
    # Keras's three members (our state inside its weights) and our metadata's copy.
    assert zipfile.ZipFile(path).namelist() == ["metadata.json", "config.json",
                                                "model.weights.h5", "keras_ckpt.json"]
    loaded = keras.saving.load_model(path)
    for v, w in zip(model.variables + model.optimizer.variables,
                    loaded.variables + loaded.optimizer.variables, strict=True):
        np.testing.assert_array_equal(v.numpy(), w.numpy(), err_msg=v.path)
    snapshot = storage.read(str(path))
    assert snapshot.meta["progress"]["epoch"] == 0


@keras.saving.register_keras_serializable(package="tests")
class WithAssets(keras.layers.Layer):
    """A layer that saves a file into the archive (like TextVectorization's vocabulary)."""

    def call(self, x):
        return x

    def save_assets(self, dir_path):
        with open(f"{dir_path}/vocabulary.txt", "w") as f:
            f.write("a\nb\n")

    def load_assets(self, dir_path):
        with open(f"{dir_path}/vocabulary.txt") as f:
            self.vocabulary = f.read().split()


def test_a_model_with_assets_is_archived_by_keras_with_our_state_beside(tmp_path):
    import zipfile

    model = keras.Sequential([keras.Input((4,)), WithAssets(), keras.layers.Dense(1)])
    model.compile("adam", "mse")
    path = tmp_path / "a.keras"
    fit(model, [keras_ckpt.ModelCheckpoint(str(path))])
    names = zipfile.ZipFile(path).namelist()
    assert "keras_ckpt.h5" in names and any(n.startswith("assets/") for n in names)
    assert keras.saving.load_model(path).layers[0].vocabulary == ["a", "b"]
    assert storage.read(str(path)).meta["progress"]["epoch"] == 0


@pytest.mark.parametrize("ext", [".weights.h5", ".keras"])
def test_opt_in_compression_is_smaller_and_reads_back_exactly(tmp_path, ext):
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256, use_bias=False,
                                                                     kernel_initializer="zeros"),
                              keras.layers.Dense(1)])
    model.compile("adam", "mse")
    paths = {}
    for compression in (None, "gzip"):
        paths[compression] = tmp_path / f"{compression}{ext}"
        fit_wide = keras_ckpt.ModelCheckpoint(str(paths[compression]), compression=compression,
                                              save_weights_only=ext == ".weights.h5")
        fit_wide.set_model(model)
        fit_wide.on_train_begin()
        fit_wide.on_epoch_begin(0)
        fit_wide.on_epoch_end(0, {"loss": 1.0})
        fit_wide.on_train_end()
    assert paths["gzip"].stat().st_size < paths[None].stat().st_size / 2  # 64 KiB of zeros
    plain, packed = storage.read(str(paths[None])), storage.read(str(paths["gzip"]))
    for name in plain.arrays:
        if not name.startswith("rng/"):
            np.testing.assert_array_equal(plain.arrays[name], packed.arrays[name])
    fresh = keras.models.clone_model(model)
    if ext == ".keras":
        fresh = keras.saving.load_model(paths["gzip"])
    else:
        fresh.load_weights(paths["gzip"])
    np.testing.assert_array_equal(fresh.layers[-1].kernel.numpy(), model.layers[-1].kernel.numpy())


def test_a_resumed_fit_learns_keras_layout_before_its_first_step(tmp_path, monkeypatch):
    """The optimizer is built by the resume: the layout is learned at train begin, and the
    process's first save does not pay for it."""
    calls = []
    record = keras_layout.layout

    def layout(*args, **kwargs):
        calls.append(stage[0])
        return record(*args, **kwargs)

    monkeypatch.setattr(keras_layout, "layout", layout)
    stage = ["before"]

    class Stage(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            stage[0] = "training"

    path = str(tmp_path / "c-{epoch}.weights.h5")
    fit(make_model(), [keras_ckpt.ModelCheckpoint(path, save_weights_only=True)])
    calls.clear()
    stage[0] = "before"
    checkpoint = keras_ckpt.ModelCheckpoint(path, save_weights_only=True, resume=True)
    fit(make_model(), [checkpoint, Stage()], epochs=3)
    assert calls == ["before"] and len(keras_ckpt.list_checkpoints(tmp_path)) == 3
