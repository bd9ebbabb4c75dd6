"""Scenario scripts: model kinds (functional multi-output, subclassed, recurrent, conv, ...)."""

from __future__ import annotations

import keras
import numpy as np
from scenarios import FEATURES, TRAIN, VALIDATION, Script, arrays_fit, dense_model, script

L = keras.layers


@script("dropout-batchnorm")
def dropout_batchnorm():
    return Script(dense_model("adam", L.BatchNormalization(), L.Dropout(0.3)), arrays_fit())


@script("gaussian-noise-alpha-dropout")
def noise():
    return Script(dense_model("adam", L.GaussianNoise(0.3), L.AlphaDropout(0.2)), arrays_fit())


@script("functional-two-outputs")
def two_outputs():
    inputs = keras.Input((FEATURES,))
    hidden = L.Dense(12, activation="tanh")(inputs)
    value = L.Dense(1, name="value")(hidden)
    label = L.Dense(3, activation="softmax", name="label")(L.Dropout(0.2)(hidden))
    model = keras.Model(inputs, {"value": value, "label": label})
    model.compile("adam", loss={"value": "mse", "label": "sparse_categorical_crossentropy"},
                  loss_weights={"value": 1.0, "label": 0.5},
                  metrics={"value": ["mae"], "label": ["accuracy"]})
    rng = np.random.default_rng(1)
    x = rng.normal(size=(TRAIN + VALIDATION, FEATURES)).astype("float32")
    ys = {"value": x[:, :1] * 2.0, "label": (np.abs(x[:, 1]) * 2).astype("int32") % 3}
    train = {k: v[:TRAIN] for k, v in ys.items()}
    val = {k: v[TRAIN:] for k, v in ys.items()}
    return Script(model, arrays_fit(x[:TRAIN], train, x[TRAIN:], val))


class Residual(keras.Model):
    """A subclassed model, built by `fit` at its first step (the usual way to write one)."""

    def __init__(self):
        super().__init__()
        self.first, self.second = L.Dense(16, activation="relu"), L.Dense(16)
        self.norm, self.head = L.LayerNormalization(), L.Dense(1)

    def call(self, x, training=False):
        h = self.first(x)
        return self.head(self.norm(h + self.second(h)))


@script("subclassed-lazily-built")
def subclassed():
    model = Residual()
    model.compile(keras.optimizers.Adam(0.01), "mse", metrics=["mae"])
    return Script(model, arrays_fit())


def _sequences(vocabulary: int = 0):
    rng = np.random.default_rng(2)
    n = TRAIN + VALIDATION
    if vocabulary:
        x = rng.integers(1, vocabulary, size=(n, 6)).astype("int32")
        y = (x.sum(axis=1, keepdims=True) % 2).astype("float32")
    else:
        x = rng.normal(size=(n, 6, 3)).astype("float32")
        y = x[:, :, 0].sum(axis=1, keepdims=True)
    return x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:]


@script("lstm")
def lstm():
    model = keras.Sequential([keras.Input((6, 3)), L.LSTM(8, dropout=0.2), L.Dense(1)])
    model.compile("rmsprop", "mse", metrics=["mae"])
    return Script(model, arrays_fit(*_sequences()))


@script("bidirectional-gru")
def gru():
    model = keras.Sequential([keras.Input((6, 3)), L.Bidirectional(L.GRU(6, recurrent_dropout=0.0)),
                              L.Dense(1)])
    model.compile("adam", "mse", metrics=["mae"])
    return Script(model, arrays_fit(*_sequences()))


@script("embedding-pooling")
def embedding():
    model = keras.Sequential([keras.Input((6,), dtype="int32"), L.Embedding(20, 4),
                              L.GlobalAveragePooling1D(), L.Dense(1, activation="sigmoid")])
    model.compile("adam", "binary_crossentropy", metrics=["accuracy", keras.metrics.AUC()])
    return Script(model, arrays_fit(*_sequences(vocabulary=20)))


@script("conv2d-augmentation")
def conv_augmentation():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(TRAIN + VALIDATION, 8, 8, 1)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 0).astype("int32")
    model = keras.Sequential([
        keras.Input((8, 8, 1)), L.RandomFlip("horizontal"), L.RandomTranslation(0.1, 0.1),
        L.Conv2D(4, 3, activation="relu"), L.MaxPooling2D(), L.Flatten(), L.Dense(2)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return Script(model, arrays_fit(x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:]))


@script("normalization-adapted")
def normalization():
    data = arrays_fit()
    data["x"] = data["x"] * 10.0 + 3.0  # far from standardized
    x_val, y_val = data["validation_data"]
    data["validation_data"] = (x_val * 10.0 + 3.0, y_val)
    norm = L.Normalization()
    norm.adapt(data["x"])
    model = keras.Sequential([keras.Input((FEATURES,)), norm, L.Dense(8, activation="elu"),
                              L.Dense(1)])
    model.compile("adam", "mse", metrics=["mae"])
    return Script(model, data)


@script("classifier-f1-macro")
def classifier():
    data = arrays_fit()
    data["y"] = (data["y"] > 0).astype("float32")
    x_val, y_val = data["validation_data"]
    data["validation_data"] = (x_val, (y_val > 0).astype("float32"))
    model = keras.Sequential([keras.Input((FEATURES,)), L.Dense(16, activation="relu"),
                              L.Dense(1, activation="sigmoid")])
    model.compile("adam", "binary_crossentropy", metrics=[
        "accuracy", keras.metrics.F1Score(average="macro", threshold=0.5),
        keras.metrics.Precision()])
    return Script(model, data)


@script("batch-size-not-dividing")
def partial_batch():
    data = arrays_fit()
    data["x"], data["y"] = data["x"][:30], data["y"][:30]  # 4 steps, the last of 6 samples
    return Script(dense_model("adam"), data)

