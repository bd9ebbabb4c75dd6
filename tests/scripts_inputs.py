"""Scenario scripts: the inputs `fit` accepts, fit arguments, and Keras callbacks beside ours."""

from __future__ import annotations

import os

import keras
import numpy as np
from scenarios import BATCH, FEATURES, TRAIN, Script, arrays_fit, dense_model, regression, script

import keras_ckpt

ALL_BUT_TORCH = ("tensorflow", "jax")


# ------------------------------------------------------------------ inputs
@script("numpy-no-shuffle")
def numpy_no_shuffle():
    return Script(dense_model(), arrays_fit(shuffle=False))


@script("numpy-batch-shuffle")
def numpy_batch_shuffle():
    return Script(dense_model(), arrays_fit(shuffle="batch"))


def _tf_data(x, y):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((x, y))


@script("tf-data-seeded-reshuffle", backends=("tensorflow",))
def tf_data_seeded():
    x, y, x_val, y_val = regression()
    train = _tf_data(x, y).shuffle(TRAIN, seed=5).batch(BATCH)
    return Script(dense_model(), {"x": train, "validation_data": _tf_data(x_val, y_val).batch(8)})


@script("tf-data-repeat-steps-per-epoch", backends=("tensorflow",),
        warns="infinite .*steps_per_epoch")
def tf_data_repeat():
    x, y, x_val, y_val = regression()
    train = _tf_data(x, y).batch(BATCH).repeat()  # 4 batches a pass, 3 an epoch
    return Script(dense_model(), {"x": train, "steps_per_epoch": 3,
                                  "validation_data": (x_val, y_val)})


@script("tf-data-repeat-whole-passes", backends=("tensorflow",))
def tf_data_repeat_whole_passes():
    x, y, x_val, y_val = regression()
    train = _tf_data(x, y).batch(BATCH).map(lambda a, b: (a * 2.0, b)).repeat()
    return Script(dense_model(), {"x": train, "steps_per_epoch": 8,  # two passes an epoch
                                  "validation_data": (x_val, y_val)})


class Indexed(keras.utils.PyDataset):
    """Batch `i` is rows 8i..8i+7: index-addressable, nothing kept between epochs."""

    def __init__(self, x, y, **kwargs):
        super().__init__(**kwargs)
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x) // BATCH

    def __getitem__(self, i):
        return self.x[i * BATCH:(i + 1) * BATCH], self.y[i * BATCH:(i + 1) * BATCH]


class ReshuffledEachEpoch(Indexed):
    """The classic Sequence recipe: `on_epoch_end` reshuffles an index array of its own."""

    def __init__(self, x, y):
        super().__init__(x, y)
        self.order, self.rng = np.arange(len(x)), np.random.default_rng(9)

    def __getitem__(self, i):
        rows = self.order[i * BATCH:(i + 1) * BATCH]
        return self.x[rows], self.y[rows]

    def on_epoch_end(self):
        self.rng.shuffle(self.order)


@script("pydataset-indexed")
def pydataset_indexed():
    x, y, x_val, y_val = regression()
    return Script(dense_model(), {"x": Indexed(x, y), "validation_data": (x_val, y_val)})


@script("pydataset-reshuffled-on-epoch-end", warns="overrides on_epoch_end")
def pydataset_reshuffled():
    x, y, x_val, y_val = regression()
    return Script(dense_model(), {"x": ReshuffledEachEpoch(x, y),
                                  "validation_data": (x_val, y_val)})


@script("python-generator", backends=ALL_BUT_TORCH,
        warns="Python generator whose position is not saved")
def python_generator():
    x, y, x_val, y_val = regression()

    def batches():
        while True:
            for i in range(0, TRAIN, BATCH):
                yield x[i:i + BATCH], y[i:i + BATCH]

    return Script(dense_model(), {"x": batches(), "steps_per_epoch": 4,
                                  "validation_data": (x_val, y_val)})


@script("dict-inputs")
def dict_inputs():
    a, b = keras.Input((FEATURES,), name="a"), keras.Input((2,), name="b")
    merged = keras.layers.Concatenate()([keras.layers.Dense(8, activation="relu")(a), b])
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(1)(merged))
    model.compile("adam", "mse", metrics=["mae"])
    x, y, x_val, y_val = regression()
    return Script(model, arrays_fit({"a": x, "b": x[:, :2] ** 2}, y,
                                    {"a": x_val, "b": x_val[:, :2] ** 2}, y_val))


# ------------------------------------------------------------------ fit arguments
@script("validation-split")
def validation_split():
    x, y, x_val, y_val = regression()
    return Script(dense_model(), {"x": np.concatenate([x, x_val]), "y": np.concatenate([y, y_val]),
                                  "batch_size": BATCH, "validation_split": 1 / 3})


@script("sample-weight")
def sample_weight():
    data = arrays_fit()
    data["sample_weight"] = np.linspace(0.2, 2.0, TRAIN).astype("float32")
    return Script(dense_model(), data)


@script("class-weight")
def class_weight():
    data = arrays_fit()
    data["y"] = (data["y"] > 0.5).astype("int32").ravel()
    x_val, y_val = data["validation_data"]
    data["validation_data"] = (x_val, (y_val > 0.5).astype("int32").ravel())
    data["class_weight"] = {0: 1.0, 1: 3.0}
    model = dense_model("adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                        outputs=2)
    return Script(model, data)


@script("steps-per-execution-2", backends=ALL_BUT_TORCH, mid_step=2)
def steps_per_execution():
    model = dense_model()
    model.compile("adam", "mse", metrics=["mae"], steps_per_execution=2)
    return Script(model, arrays_fit())


# ------------------------------------------------------------------ Keras callbacks beside ours
@script("reduce-lr-on-plateau")
def reduce_lr():
    plateau = keras.callbacks.ReduceLROnPlateau("val_loss", factor=0.5, patience=0,
                                                min_delta=10.0, cooldown=1)
    return Script(dense_model(keras.optimizers.Adam(0.02)), arrays_fit(), [plateau])


@script("learning-rate-scheduler")
def lr_scheduler():
    # A function of the current rate: applied twice to a resumed epoch, it would show.
    schedule = keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.6)
    return Script(dense_model(keras.optimizers.SGD(0.02, momentum=0.5)), arrays_fit(), [schedule])


@script("early-stopping-restore-best")
def early_stopping():
    stop = keras_ckpt.EarlyStopping("val_loss", patience=3, restore_best_weights=True)
    return Script(dense_model(), arrays_fit(), [stop])


@script("terminate-on-nan-beside-keras-own")
def terminate_on_nan():
    guards = [keras_ckpt.TerminateOnNaN(), keras.callbacks.TerminateOnNaN()]
    return Script(dense_model(), arrays_fit(), guards)


@script("csv-logger", warns="CSVLogger.*append=True")
def csv_logger():
    log = keras.callbacks.CSVLogger(os.path.join(os.environ["MATRIX_RUN_DIR"], "log.csv"))
    return Script(dense_model(), arrays_fit(), [log])
