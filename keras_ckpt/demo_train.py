"""A small deterministic training run that the demo and the tests kill and resume.

Usage: python -m keras_ckpt.demo_train DIR OUT.npz [--kill-epoch K | --kill-step S]
       [--data numpy|numpy_noshuffle|tfdata|tfdata_plain] [--save-freq N] [--spe N]
       [--epochs E] [--early-stopping PATIENCE] [--best-on-disk]
       [--daily-budget SECONDS --ledger PATH [--sync-interval S]]

Trains a model with Dropout and BatchNormalization, Adam with a learning-rate
schedule, seeded and with op determinism, with `ModelCheckpoint(resume=True)`
writing into DIR. `--kill-epoch K` SIGKILLs the process right after epoch K
(0-based), `--kill-step S` after global step S. `--early-stopping P` adds
`EarlyStopping(patience=P, restore_best_weights=True)` (`--best-on-disk` keeps
its best weights in DIR). `--daily-budget` adds a `BudgetStop` charging the
ledger at PATH (real time). At the end, every model and optimizer variable, the
history and the early-stopping outcome are written to OUT.npz.
"""

from __future__ import annotations

import argparse
import json
import os
import signal

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_ckpt  # noqa: E402

__all__ = ["main"]


class Kill(keras.callbacks.Callback):
    """SIGKILLs this process right after epoch K ends, or after global step S."""

    def __init__(self, epoch=None, step=None):
        super().__init__()
        self.kill_epoch, self.kill_step, self.seen = epoch, step, 0
        if step is not None:
            self.on_train_batch_end = self._batch_end

    def on_epoch_end(self, epoch, logs=None):
        if self.kill_epoch is not None and epoch == self.kill_epoch:
            os.kill(os.getpid(), signal.SIGKILL)

    def _batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) >= self.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> None:
    """Runs the training; see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m keras_ckpt.demo_train")
    p.add_argument("directory")
    p.add_argument("out")
    p.add_argument("--kill-epoch", type=int)
    p.add_argument("--kill-step", type=int)
    p.add_argument("--data", default="numpy")
    p.add_argument("--save-freq", default="epoch")
    p.add_argument("--spe", type=int, default=1)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--early-stopping", type=int)
    p.add_argument("--best-on-disk", action="store_true")
    p.add_argument("--daily-budget", type=float)
    p.add_argument("--ledger")
    p.add_argument("--sync-interval", type=float, default=0.5)
    a = p.parse_args(argv)

    keras.utils.set_random_seed(7)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1)) + 0.1 * rng.normal(size=(96, 1))).astype("float32")
    val = (x[:32] + 0.05, y[:32])

    model = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.BatchNormalization(),
        keras.layers.Dropout(0.3),
        keras.layers.Dense(1),
    ])
    schedule = keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=5, decay_rate=0.9)
    model.compile(keras.optimizers.Adam(schedule), loss="mse", metrics=["mae"],
                  steps_per_execution=a.spe)

    save_freq = a.save_freq if a.save_freq == "epoch" else int(a.save_freq)
    callbacks = [keras_ckpt.ModelCheckpoint(
        os.path.join(a.directory, "ckpt-{epoch:02d}-{batch}.keras" if save_freq != "epoch"
                     else "ckpt-{epoch:02d}.keras"),
        save_freq=save_freq, resume=True)]
    stop = None
    if a.early_stopping is not None:
        stop = keras_ckpt.EarlyStopping(
            patience=a.early_stopping, restore_best_weights=True, min_delta=0.05,
            best_weights_path=os.path.join(a.directory, "best.weights.h5") if a.best_on_disk
            else None)
        callbacks.append(stop)
    budget = None
    if a.daily_budget is not None:
        budget = keras_ckpt.BudgetStop(daily_budget=a.daily_budget, ledger=a.ledger,
                                       sync_interval=a.sync_interval, verbose=0)
        callbacks.append(budget)
    if a.kill_epoch is not None or a.kill_step is not None:
        callbacks.append(Kill(a.kill_epoch, a.kill_step))

    fit = dict(epochs=a.epochs, validation_data=val, callbacks=callbacks, verbose=0)
    if a.data == "numpy":
        history = model.fit(x, y, batch_size=16, shuffle=True, **fit)
    elif a.data == "numpy_noshuffle":
        history = model.fit(x, y, batch_size=16, shuffle=False, **fit)
    elif a.data in ("tfdata", "tfdata_plain"):
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        if a.data == "tfdata":
            ds = ds.apply(keras_ckpt.data.EpochShuffle(96, seed=3))
        else:  # what users write today: reshuffles every epoch, state inside TF
            ds = ds.shuffle(96, seed=3)
        history = model.fit(ds.batch(16), **fit)
    else:
        raise SystemExit(f"unknown --data {a.data}")

    arrays = {f"model/{i}": v.numpy() for i, v in enumerate(model.variables)}
    arrays.update({f"optimizer/{i}": v.numpy() for i, v in enumerate(model.optimizer.variables)})
    outcome = {"epoch": history.epoch, "history": history.history}
    if budget is not None:
        outcome.update(budget_stop_reason=budget.stop_reason, budget_session=budget.session)
    if stop is not None:
        outcome.update(stopped_epoch=stop.stopped_epoch, best_epoch=stop.best_epoch,
                       stop_reason=stop.stop_reason)
    arrays["history"] = np.frombuffer(json.dumps(outcome).encode(), dtype=np.uint8)
    np.savez(a.out, **arrays)


if __name__ == "__main__":
    main()
