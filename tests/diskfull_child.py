"""Trains into DIR until writes fail; prints what it saw as JSON (run by test_fault_tolerance).

Usage: python diskfull_child.py DIR warn|raise [--fsize-after-epoch BYTES]

`--fsize-after-epoch` lowers this process's file-size limit (RLIMIT_FSIZE)
after the first epoch, so later checkpoint writes fail with EFBIG like a
quota; without it, DIR is expected to be a small filesystem that fills up.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ckpt  # noqa: E402
from keras_ckpt import manager, storage  # noqa: E402


class Limit(keras.callbacks.Callback):
    def __init__(self, size):
        super().__init__()
        self.size = size

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.size, resource.RLIM_INFINITY))


def main() -> None:
    directory, policy = sys.argv[1], sys.argv[2]
    limit = int(sys.argv[4]) if len(sys.argv) > 4 else None
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2048), keras.layers.Dense(1)])
    model.compile("adam", "mse")  # about 230 KiB of state with Adam's slots
    checkpoint = keras_ckpt.ModelCheckpoint(os.path.join(directory, "ckpt-{epoch:02d}.keras"),
                                            on_save_error=policy)
    callbacks = [checkpoint] if limit is None else [checkpoint, Limit(limit)]
    outcome: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.fit(x, y, epochs=6, batch_size=16, verbose=0, callbacks=callbacks)
            outcome["raised"] = None
        except OSError as e:
            outcome["raised"] = f"{type(e).__name__}: {e}"
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    outcome["epochs_trained"] = int(model.optimizer.iterations.numpy()) // 4
    outcome["save_errors"] = checkpoint.save_errors
    outcome["warnings"] = [str(w.message) for w in caught if "FAILED" in str(w.message)]
    outcome["files"] = sorted(os.listdir(directory))
    outcome["valid"] = []
    for info in manager.list_checkpoints(directory, include_invalid=True):
        storage.read(info.path)  # raises if any visible file is damaged
        outcome["valid"].append([os.path.basename(info.path), info.epoch])
    print("RESULT " + json.dumps(outcome), flush=True)


if __name__ == "__main__":
    main()
