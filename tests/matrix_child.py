"""One run of a scenario-matrix script (tests/scenarios.py), maybe killed on the way.

Usage: python tests/matrix_child.py NAME DIR OUT.npz [--kill KIND@EPOCH[:STEP] | --plain]

Seeds everything (and op determinism on TensorFlow), builds script NAME and
fits it for 4 epochs with `ModelCheckpoint(DIR/ckpt-{epoch}-{batch}.weights.h5,
save_weights_only=True, resume=True, save_freq=2)` first and the script's callbacks after it.
`--kill` ends the process for real, from the last callback:
`start@E` SIGKILL as epoch E (0-based) begins, `mid@E:S` SIGKILL after step S
of epoch E, `val@E` SIGTERM at the first validation batch of epoch E (the
checkpoint's preemption handling then exits with 143). `--plain` fits without
our ModelCheckpoint (the script's own callbacks only): the run a user has
without keras-ckpt, the matrix's reference. A run that ends writes
every model and optimizer variable, the history and where it resumed from to
OUT.npz.
"""

from __future__ import annotations

import json
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ckpt  # noqa: E402

EPOCHS = 4


class Kill(keras.callbacks.Callback):
    """Ends the process at one point of the fit, as a preemption or a crash would."""

    def __init__(self, spec: str):
        super().__init__()
        kind, where = spec.split("@")
        epoch, _, step = where.partition(":")
        self.kind, self.epoch, self.step = kind, int(epoch), int(step or 0)
        self.current = None

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch
        if self.kind == "start" and epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, batch, logs=None):
        if self.kind == "mid" and self.current == self.epoch and batch + 1 == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_test_batch_begin(self, batch, logs=None):
        if self.kind == "val" and self.current == self.epoch and batch == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> int:
    name, directory, out = argv[:3]
    kill = argv[argv.index("--kill") + 1] if "--kill" in argv else None
    keras.utils.set_random_seed(0)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    os.environ["MATRIX_RUN_DIR"] = directory
    import scenarios

    script = scenarios.SCRIPTS[name]()
    checkpoint = keras_ckpt.ModelCheckpoint(
        os.path.join(directory, "ckpt-{epoch}-{batch}.weights.h5"), resume=True, save_freq=2,
        save_weights_only=True, **script.checkpoint)
    plain = "--plain" in argv
    callbacks = ([] if plain else [checkpoint]) + script.callbacks + ([Kill(kill)] if kill else [])
    history = script.model.fit(epochs=EPOCHS, verbose=0, callbacks=callbacks, **script.fit)
    model = script.model
    arrays = {f"model/{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.variables)}
    arrays.update({f"optimizer/{i}": keras.ops.convert_to_numpy(v)
                   for i, v in enumerate(model.optimizer.variables)})
    resumed = None if plain else checkpoint.resumed_from
    outcome = {"history": history.history, "epoch": history.epoch,
               "resumed_from": None if resumed is None else [resumed.epoch, resumed.step]}
    arrays["outcome"] = np.frombuffer(json.dumps(outcome).encode(), dtype=np.uint8)
    np.savez(out, **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
