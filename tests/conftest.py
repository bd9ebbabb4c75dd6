"""Shared fixtures: quiet TF, tiny deterministic models and generated data."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("PYTHONHASHSEED", "0")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()

# Keras's torch backend refuses steps_per_execution > 1 (keras/src/backend/torch/trainer.py).
needs_steps_per_execution = pytest.mark.skipif(
    BACKEND == "torch", reason="Keras's torch backend has no steps_per_execution > 1")


class EpochFed(keras.utils.PyDataset):
    """A PyDataset whose `epoch` is fit's epoch index, told by the callback `feed()` returns.

    Each backend calls a PyDataset's own epoch hooks a different number of
    times (JAX and torch iterate once more to build the model), so a data set
    that counts them itself would see other epochs on other backends.
    """

    epoch = -1

    def feed(self) -> keras.callbacks.Callback:
        data = self

        class Feed(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                data.epoch = epoch

        return Feed()


def make_data(n: int = 64, features: int = 4, classes: int = 0, seed: int = 0):
    """Generated regression (classes=0) or classification data, deterministic."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    w = rng.normal(size=(features, 1)).astype("float32")
    if classes:
        y = (x @ w > 0).astype("int32").ravel() % classes
    else:
        y = (x @ w + 0.1 * rng.normal(size=(n, 1))).astype("float32")
    return x, y


def make_model(features: int = 4, dropout: float = 0.0, batchnorm: bool = False,
               classes: int = 0, seed: int = 0, metrics=None, optimizer=None) -> keras.Model:
    """A tiny compiled MLP; optional Dropout and BatchNormalization."""
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((features,)), keras.layers.Dense(8, activation="relu")]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization())
    if dropout:
        layers.append(keras.layers.Dropout(dropout))
    if classes:
        layers.append(keras.layers.Dense(1, activation="sigmoid"))
        loss = "binary_crossentropy"
    else:
        layers.append(keras.layers.Dense(1))
        loss = "mse"
    model = keras.Sequential(layers)
    model.compile(optimizer=optimizer or keras.optimizers.Adam(0.01), loss=loss,
                  metrics=metrics or [])
    return model


@pytest.fixture
def data():
    return make_data()


@pytest.fixture
def classification_data():
    return make_data(classes=2)
