"""Shared fixtures: quiet TF, tiny deterministic models and generated data."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("PYTHONHASHSEED", "0")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


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
