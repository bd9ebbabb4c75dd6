"""The tiny Keras models and data helpers the tests share (through conftest's names)."""

from __future__ import annotations

import keras


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
