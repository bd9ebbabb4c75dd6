"""bfloat16 and float8 variables (ml_dtypes): saved, verified, loaded by Keras, resumed bitwise."""

from __future__ import annotations

import h5py
import keras
import ml_dtypes
import numpy as np
import pytest
from conftest import make_data

import keras_ckpt
from keras_ckpt import storage
from keras_ckpt.state import Snapshot


def bf16_model(seed: int = 0, dtype: str = "bfloat16") -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, dtype=dtype),
                              keras.layers.Dense(1, dtype=dtype)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def fit(model, callbacks=(), epochs=1, initial_epoch=0):
    x, y = make_data(n=32)
    model.fit(x, y, batch_size=8, epochs=epochs, initial_epoch=initial_epoch, verbose=0,
              shuffle=False, callbacks=list(callbacks))


def bits(value) -> np.ndarray:
    """The raw bytes of a variable's value (bitwise comparison, any dtype)."""
    array = np.ascontiguousarray(keras.ops.convert_to_numpy(value))
    return array.reshape(-1).view(np.uint8)


def assert_same_bits(a_vars, b_vars):
    for a, b in zip(a_vars, b_vars, strict=True):
        assert str(a.dtype) == str(b.dtype), a.path
        np.testing.assert_array_equal(bits(a), bits(b), err_msg=a.path)


def keras_dataset_attrs(path):
    found = {}
    with h5py.File(path, "r") as f:
        def visit(name):  # by link: a dataset shared with our group has two names
            if not name.startswith("keras_ckpt") and isinstance(f[name], h5py.Dataset):
                found[name] = dict(f[name].attrs)
        f.visit_links(visit)
    return found


@pytest.mark.parametrize("name", ["w.weights.h5", "m.keras"])
def test_a_float64_model_is_stored_as_float64_and_loads_in_keras(tmp_path, name):
    # NumPy says None == float64: float64 was once taken for one of ml_dtypes' floats
    # and stored as opaque bytes, which Keras cannot load.
    path = tmp_path / name
    model = bf16_model(dtype="float64")
    fit(model, [keras_ckpt.ModelCheckpoint(str(path), save_weights_only=name.endswith(".h5"))])
    snapshot = storage.read(str(path))
    assert {a.dtype for k, a in snapshot.arrays.items() if k.startswith("model/")} == {
        np.dtype("float64")}
    if name.endswith(".weights.h5"):
        with h5py.File(path, "r") as f:
            kinds = {f[n].dtype.kind for n in keras_dataset_attrs(path)}
        assert "V" not in kinds  # no opaque bytes: numbers Keras reads
        loaded = bf16_model(seed=5, dtype="float64")
        fit(loaded)
        loaded.load_weights(path)
    else:
        loaded = keras.saving.load_model(path)
    assert_same_bits(model.weights + model.optimizer.variables,
                     loaded.weights + loaded.optimizer.variables)


@pytest.mark.parametrize("name", ["w.weights.h5", "m.keras"])
def test_bfloat16_model_saves_loads_in_keras_and_restores_bitwise(tmp_path, name):
    path = tmp_path / name
    model = bf16_model()
    assert {str(v.dtype) for v in model.weights} == {"bfloat16"}
    fit(model, [keras_ckpt.ModelCheckpoint(str(path), save_weights_only=name.endswith(".h5"))])

    snapshot = storage.read(str(path))  # every checksum verified
    assert any(a.dtype == ml_dtypes.bfloat16 for a in snapshot.arrays.values())

    if name.endswith(".weights.h5"):
        # Keras's attributes on its datasets, exactly as its own save_weights writes them.
        theirs = tmp_path / "theirs.weights.h5"
        model.save_weights(theirs)
        assert keras_dataset_attrs(path) == keras_dataset_attrs(theirs)
        assert {"dtype": "bfloat16"} in keras_dataset_attrs(path).values()
        loaded = bf16_model(seed=5)
        fit(loaded)  # builds the optimizer, so Keras loads its variables too
        loaded.load_weights(path)
    else:
        loaded = keras.saving.load_model(path)
    assert_same_bits(model.weights + model.optimizer.variables,
                     loaded.weights + loaded.optimizer.variables)

    restored = bf16_model(seed=7)
    keras_ckpt.restore(restored, str(path))
    assert_same_bits(model.variables + model.optimizer.variables,
                     restored.variables + restored.optimizer.variables)


def test_bfloat16_training_resumes_bitwise(tmp_path):
    straight = bf16_model()
    fit(straight, epochs=3)
    path = str(tmp_path / "last.keras")
    fit(bf16_model(), [keras_ckpt.ModelCheckpoint(path, resume=True)], epochs=2)
    resumed = bf16_model(seed=3)
    checkpoint = keras_ckpt.ModelCheckpoint(path, resume=True)
    fit(resumed, [checkpoint], epochs=3)
    assert (checkpoint.resumed_from.epoch, checkpoint.resumed_from.global_step) == (1, 8)
    assert_same_bits(straight.variables + straight.optimizer.variables,
                     resumed.variables + resumed.optimizer.variables)


class Float8Scale(keras.layers.Layer):
    """A layer with a float8_e4m3fn variable (as a quantized layer's scale)."""

    def build(self, input_shape):
        def init(shape, dtype=None):
            return np.linspace(-3, 3, int(np.prod(shape))).reshape(shape).astype(
                ml_dtypes.float8_e4m3fn)

        self.scale = self.add_weight(shape=(input_shape[-1],), dtype="float8_e4m3fn",
                                     initializer=init, trainable=False)

    def call(self, x):
        return x * keras.ops.cast(self.scale, x.dtype)


def float8_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), Float8Scale(), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


@pytest.mark.parametrize("name", ["w.weights.h5", "m.keras"])
def test_float8_variable_saves_and_restores_bitwise(tmp_path, name):
    path = str(tmp_path / name)
    model = float8_model()
    assert "float8_e4m3fn" in {str(v.dtype) for v in model.weights}
    fit(model, [keras_ckpt.ModelCheckpoint(path, save_weights_only=name.endswith(".h5"))])
    restored = float8_model(seed=4)
    keras_ckpt.restore(restored, path)
    assert_same_bits(model.variables + model.optimizer.variables,
                     restored.variables + restored.optimizer.variables)


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("name", ["s.h5", "s.keras"])
def test_small_float_arrays_round_trip_bitwise_and_damage_is_detected(tmp_path, dtype, name):
    values = np.array([[-448.0, -1.5, 0.0, 2.0 ** -6], [3.25, 7.0, 240.0, -0.0]], np.float32)
    arrays = {"a": values.astype(getattr(ml_dtypes, dtype)),
              "scalar": np.array(1.5, dtype=getattr(ml_dtypes, dtype)),
              "f32": values}
    path = str(tmp_path / name)
    storage.write(path, Snapshot(arrays=arrays, meta={}))
    back = storage.read(path)
    assert back.arrays.keys() == arrays.keys()
    for key, array in arrays.items():
        assert back.arrays[key].dtype == array.dtype and back.arrays[key].shape == array.shape
        np.testing.assert_array_equal(bits(back.arrays[key]), bits(array), err_msg=key)
    if name.endswith(".h5"):
        with h5py.File(path, "r+") as f:
            dataset = f["keras_ckpt/arrays/a00000"]
            data = dataset[()]
            data.reshape(-1).view(np.uint8)[0] ^= 1
            dataset[...] = data
        with pytest.raises(keras_ckpt.CorruptCheckpointError, match="s.h5.*fails its checksum"):
            storage.read(path)
