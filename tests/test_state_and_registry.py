"""State capture for optimizer variants, the functional API, the registry and EpochShuffle."""

from __future__ import annotations

import importlib
import importlib.util

import keras
import numpy as np
import pytest
from conftest import make_data, make_model

import keras_ckpt
import keras_ckpt.storage
from keras_ckpt import registry
from keras_ckpt.callbacks.base import StatefulCallback

tf = importlib.import_module("tensorflow") if importlib.util.find_spec("tensorflow") else None
pytestmark = pytest.mark.skipif(tf is None, reason="tf.data inputs and strategies need TensorFlow")


@pytest.mark.parametrize("make_optimizer", [
    lambda: keras.optimizers.Adam(0.01, use_ema=True, ema_overwrite_frequency=None),
    lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01, momentum=0.9)),
], ids=["adam-ema", "loss-scale"])
def test_optimizer_extras_round_trip(tmp_path, make_optimizer):
    model = make_model(optimizer=make_optimizer())
    x, y = make_data(32)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[keras_ckpt.ModelCheckpoint(str(tmp_path / "c.keras"))])
    fresh = make_model(optimizer=make_optimizer(), seed=5)
    keras_ckpt.restore(fresh, tmp_path / "c.keras")
    saved = {v.path: v.numpy() for v in model.optimizer.variables}
    restored = {v.path: v.numpy() for v in fresh.optimizer.variables}
    assert len(saved) == len(restored) > 2
    for a, b in zip(saved.values(), restored.values(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_initial_value_threshold_and_best_checkpoint(tmp_path):
    x, y = make_data(48)
    model = make_model()
    cb = keras_ckpt.ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), monitor="loss",
                                    save_best_only=True, initial_value_threshold=-1.0)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[cb])
    assert keras_ckpt.list_checkpoints(tmp_path) == []  # nothing beat the threshold
    cb = keras_ckpt.ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), monitor="loss")
    model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[cb])
    best = keras_ckpt.best_checkpoint(tmp_path, monitor="loss", mode="min")
    values = [c.monitor_value for c in keras_ckpt.list_checkpoints(tmp_path)]
    assert best.monitor_value == min(values) and len(values) == 3


class Counter(StatefulCallback):
    def __init__(self, state_key=""):
        if state_key:
            self.state_key = state_key
        super().__init__()
        self.count = 0

    def epoch_end(self, epoch, logs):
        self.count += 1

    def get_state(self):
        return {"count": self.count, "vec": np.arange(self.count, dtype="int64")}

    def set_state(self, state):
        self.count = state["count"]
        assert state["vec"].tolist() == list(range(self.count))


def test_registry_saves_the_callbacks_of_this_fit_only(tmp_path):
    model = make_model()
    x, y = make_data(16)
    old = Counter()
    model.fit(x, y, epochs=1, verbose=0, callbacks=[old])
    a, b = Counter(), Counter()
    model.fit(x, y, epochs=1, verbose=0, callbacks=[a, b])
    objects = registry.objects_for(model)
    assert objects["Counter"] is a and objects["Counter_1"] is b
    assert not any(o is old for o in objects.values())


@pytest.mark.parametrize("checkpoint_first", [True, False])
def test_callback_state_is_saved_whatever_the_order(tmp_path, checkpoint_first):
    x, y = make_data(16)
    path = str(tmp_path / "e{epoch}.keras")

    def callbacks(counter, **kw):
        cb = keras_ckpt.ModelCheckpoint(path, **kw)
        return [cb, counter] if checkpoint_first else [counter, cb]

    counter = Counter()
    make_model().fit(x, y, epochs=3, verbose=0, callbacks=callbacks(counter))
    assert counter.count == 3
    saved = [keras_ckpt.storage.read_meta(c.path)["objects"]["Counter"]["json"]["count"]
             for c in keras_ckpt.list_checkpoints(tmp_path)]
    assert saved == [1, 2, 3]  # each checkpoint includes its own epoch
    resumed = Counter()
    make_model().fit(x, y, epochs=4, verbose=0, callbacks=callbacks(resumed, resume=True))
    assert resumed.count == 4 and resumed.restored_this_fit()


def test_epoch_shuffle_reshuffles_each_epoch_and_resumes():
    shuffle = keras_ckpt.data.EpochShuffle(8, seed=1, name="test_shuffle")
    ds = tf.data.Dataset.range(8).apply(shuffle)
    epochs = [list(ds.as_numpy_iterator()) for _ in range(3)]
    assert epochs[0] != epochs[1] != epochs[2] and sorted(epochs[0]) == list(range(8))
    assert int(ds.cardinality()) == 8
    state = shuffle.get_state()
    again = keras_ckpt.data.EpochShuffle(8, seed=1, name="test_shuffle")
    again.set_state({"epoch": 1, "seed": 1})
    ds2 = tf.data.Dataset.range(8).apply(again)
    assert list(ds2.as_numpy_iterator()) == epochs[1]
    assert state["epoch"] == 3
    with pytest.raises(ValueError, match="seed 1"):
        keras_ckpt.data.EpochShuffle(8, seed=2, name="test_shuffle").set_state(state)
    with pytest.raises(ValueError, match="`buffer_size` must be >= 1"):
        keras_ckpt.data.EpochShuffle(0, seed=1)
