"""What the multi-process test children share: arguments, data, the small model, a clock.

Imported by tests/distributed_child.py and tests/multi_worker_child.py after
they have set up the backend's environment (devices, TF_CONFIG).
"""

from __future__ import annotations

import argparse
import json

import keras
import numpy as np


def parser(*positionals: str) -> argparse.ArgumentParser:
    """The children's common command line: POSITIONALS DIRECTORY OUT and the run's options."""
    p = argparse.ArgumentParser()
    for name in (*positionals, "directory", "out"):
        p.add_argument(name)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--kill-step", type=int)
    p.add_argument("--budget-steps", type=int)
    p.add_argument("--poison-step", type=int)
    return p


def data(poison_step: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """96 regression samples: 6 global batches of 16 an epoch; step P's targets NaN if asked."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1))).astype("float32")
    if poison_step is not None:  # not shuffled: step P of each epoch (1-6) is NaN
        start = 16 * ((poison_step - 1) % 6)
        y[start:start + 16] = np.nan
    return x, y


def small_model() -> keras.Model:
    """Dense, BatchNormalization, Dropout, Dense; compiled (build it in the strategy's scope)."""
    model = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(16, activation="relu", name="dense"),
        keras.layers.BatchNormalization(),
        keras.layers.Dropout(0.3),
        keras.layers.Dense(1, name="head"),
    ])
    model.compile(keras.optimizers.Adam(0.02), loss="mse", metrics=["mae"])
    return model


class Clock(keras.callbacks.Callback):
    """A simulated clock: `rate` seconds per trained step."""

    def __init__(self, rate: float = 1.0):
        super().__init__()
        self.now, self.rate = 0.0, rate

    def __call__(self) -> float:
        return self.now

    def on_train_batch_end(self, batch, logs=None):
        self.now += self.rate


def write_report(out: str, model: keras.Model, history, checkpoint, guard, **extra) -> None:
    """Writes the model's and optimizer's variables and what the run reports to OUT (.npz)."""
    arrays = {f"model/{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.variables)}
    arrays.update({f"optimizer/{i}": keras.ops.convert_to_numpy(v)
                   for i, v in enumerate(model.optimizer.variables)})
    resumed = checkpoint.resumed_from
    outcome = {
        "history": history.history, "epoch": history.epoch,
        "resumed_from": None if resumed is None else [resumed.epoch, resumed.step],
        "iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "nan_events": None if guard is None else [[e.epoch, e.step] for e in guard.events],
        **extra,
    }
    arrays["outcome"] = np.frombuffer(json.dumps(outcome).encode(), dtype=np.uint8)
    np.savez(out, **arrays)
