"""A fit with keras-ckpt builds its compiled state before the first trace (fit/first_trace.py).

On TensorFlow Keras builds the metrics, loss and optimizer inside the first
trace and so traces the step twice; a fit with a keras-ckpt callback builds them
at train begin, as a resumed fit must, and traces once. The result is Keras's,
bitwise (the scenario matrix also compares each script's resumed chain with a run
without keras-ckpt); where it could differ, Keras's own path is left alone.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import BACKEND

import keras_ckpt

pytestmark = pytest.mark.skipif(BACKEND != "tensorflow", reason="Keras defers building on TF only")


def classifier(seed=0, inputs=True):
    keras.utils.set_random_seed(seed)
    layers = [keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1, activation="sigmoid")]
    model = keras.Sequential(([keras.Input((4,))] if inputs else []) + layers)
    model.compile("adam", "binary_crossentropy", metrics=["accuracy", "auc"])
    return model


def counting_traces(model):
    traces = []
    step = model.train_step

    def train_step(data):
        traces.append(1)
        return step(data)

    model.train_step = train_step
    return traces


class BuiltAtTrainBegin(keras.callbacks.Callback):
    """Records, after keras-ckpt's callbacks, whether the optimizer is built at train begin."""

    def on_train_begin(self, logs=None):
        self.built = self.model.optimizer.built


def data(n=70):  # 70 = 4 batches of 16 and a partial one: the spec's batch size is None
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype("float32")
    return x, (x[:, :1] > 0).astype("int32")


def test_a_fit_with_keras_ckpt_traces_once_and_ends_as_keras_alone_does(tmp_path):
    x, y = data()
    results = []
    for ours in (False, True):
        model = classifier()
        traces = counting_traces(model)
        callbacks = [keras_ckpt.ModelCheckpoint(str(tmp_path / "w.weights.h5"),
                                                save_weights_only=True)] if ours else []
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, validation_data=(x, y),
                            callbacks=callbacks)
        results.append((len(traces), [v.numpy() for v in model.variables],
                        [v.numpy() for v in model.optimizer.variables], history.history))
    (keras_traces, *alone), (our_traces, *ours) = results
    assert keras_traces == 2 and our_traces == 1  # Keras alone traces twice (pinned)
    for a, b in zip(alone[0] + alone[1], ours[0] + ours[1], strict=True):
        np.testing.assert_array_equal(a, b)
    assert alone[2] == ours[2]


class CustomStep(keras.Sequential):
    def train_step(self, data):  # feeds its metrics something else than the input's targets
        x, y = data
        return super().train_step((x, 1 - y))


def padded(x, y):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((x, y)).padded_batch(16, padded_shapes=([None], [1]))


@pytest.mark.parametrize("case", ["custom-train-step", "run-eagerly", "unknown-shape",
                                  "unbuilt-model"])
def test_where_the_result_could_differ_keras_builds_it_in_the_trace(case, tmp_path):
    x, y = data(32)
    model = classifier(inputs=case != "unbuilt-model")
    if case == "custom-train-step":
        model = CustomStep([keras.Input((4,)), *model.layers])
        model.compile("adam", "binary_crossentropy", metrics=["accuracy"])
    if case == "run-eagerly":
        model.compile("adam", "binary_crossentropy", metrics=["accuracy"], run_eagerly=True)
    inputs = ({"x": padded(x, y), "shuffle": False} if case == "unknown-shape"
              else {"x": x, "y": y, "batch_size": 16})
    probe = BuiltAtTrainBegin()
    model.fit(**inputs, epochs=1, verbose=0, callbacks=[keras_ckpt.ModelCheckpoint(
        str(tmp_path / "w.weights.h5"), save_weights_only=True), probe])
    assert probe.built is False
    assert model.optimizer.built  # Keras built it, in the first step


def test_with_every_condition_met_it_is_built_at_train_begin(tmp_path):
    x, y = data(32)
    probe = BuiltAtTrainBegin()
    model = classifier()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[
        keras_ckpt.EarlyStopping("loss", patience=5), probe])  # any keras-ckpt callback
    assert probe.built is True
