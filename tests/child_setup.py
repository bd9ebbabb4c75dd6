"""What the multi-process test children share: arguments, data, the small model, a clock.

Imported by tests/distributed_child.py, tests/multi_worker_child.py and
tests/jax_processes_child.py after
they have set up the backend's environment (devices, TF_CONFIG).
"""

from __future__ import annotations

import argparse
import builtins
import io
import json
import os
import signal

import h5py
import keras
import numpy as np

import keras_ckpt


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


class Reordered(keras.Model):
    """`small_model`'s layers and variable paths, listed head first: the same variables in
    another order (a checkpoint of one restores into the other, matched by path)."""

    def __init__(self):
        super().__init__(name="sequential")
        self.head = keras.layers.Dense(1, name="head")
        self.dropout = keras.layers.Dropout(0.3)
        self.norm = keras.layers.BatchNormalization()
        self.dense = keras.layers.Dense(16, activation="relu", name="dense")

    def call(self, x, training=False):
        hidden = self.norm(self.dense(x), training=training)
        return self.head(self.dropout(hidden, training=training))


def reordered_model() -> keras.Model:
    """A built, compiled `Reordered`: its first variable is the head's kernel."""
    model = Reordered()
    model(np.zeros((1, 6), "float32"))
    model.compile(keras.optimizers.Adam(0.02), loss="mse", metrics=["mae"])
    assert model.variables[0].path == "sequential/head/kernel"
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
    def host(v):  # a variable split across JAX processes: this process's part
        value = v.value
        if getattr(value, "is_fully_addressable", True) or value.is_fully_replicated:
            return keras.ops.convert_to_numpy(v)
        return np.stack([np.asarray(s.data) for s in value.addressable_shards])

    arrays = {f"model/{i}": host(v) for i, v in enumerate(model.variables)}
    arrays.update({f"optimizer/{i}": host(v) for i, v in enumerate(model.optimizer.variables)})
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


def record_writes(directory: str) -> list[str]:
    """Records every change this process makes under `directory` (best effort, in Python)."""
    root = os.path.realpath(directory)
    changes: list[str] = []

    def note(what, path):
        if isinstance(path, (str, os.PathLike)):
            full = os.path.realpath(os.fspath(path))
            if full == root or full.startswith(root + os.sep):
                changes.append(f"{what} {os.path.relpath(full, root)}")

    def wrap(module, name, check):
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            check(*args, **kwargs)
            return original(*args, **kwargs)

        setattr(module, name, wrapped)

    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def check_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            note("open", file)

    wrap(builtins, "open", check_open)
    wrap(io, "open", check_open)
    wrap(os, "open", lambda path, flags, *a, **k: note("open", path) if flags & writing else None)
    wrap(h5py, "File", lambda name, mode="r", *a, **k: note("h5py", name) if mode != "r" else None)
    for name in ("replace", "rename", "remove", "unlink", "mkdir", "makedirs", "rmdir"):
        wrap(os, name, lambda path, *a, _name=name, **k: note(_name, path))
    return changes


class AtStep(keras.callbacks.Callback):
    """Sends `signum` to this process after global step `step`, once."""

    def __init__(self, step, signum):
        super().__init__()
        self.step, self.signum, self.sent = step, signum, False

    def on_train_batch_end(self, batch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if not self.sent and step >= self.step:
            self.sent = True
            os.kill(os.getpid(), self.signum)


def two_process_callbacks(a, index: int, model: keras.Model, checkpoint, callbacks: list,
                          changes: list[str]) -> list:
    """The two-process children's callbacks: `callbacks` (the checkpoint's first) with what
    the arguments ask for, and a last one that writes the report when training ends.

    BudgetStop (a daily budget of `--budget-steps`) on a simulated clock that runs ten times
    faster in process 1, TerminateOnNaN with `--poison-step`, a SIGKILL (`--kill-step`) or
    SIGTERM (`--signal-step`) of process 1 after that global step, a SIGINT of process 0
    (`--sigint-chief-step`).
    """
    budget = guard = None
    if a.budget_steps is not None:
        clock = Clock(1.0 if index == 0 else 10.0)
        budget = keras_ckpt.BudgetStop(daily_budget=a.budget_steps + 0.5, clock=clock,
                                       ledger=os.path.join(a.directory, "ledger.json"),
                                       verbose=0)
        callbacks = [clock, *callbacks, budget]
    if a.poison_step is not None:
        guard = keras_ckpt.TerminateOnNaN(
            verbose=0, **({"action": "rollback"} if getattr(a, "rollback", False) else {}))
        callbacks.append(guard)
    stops = [("kill_step", 1, signal.SIGKILL), ("signal_step", 1, signal.SIGTERM),
             ("sigint_chief_step", 0, signal.SIGINT)]
    for name, who, signum in stops:
        if getattr(a, name, None) is not None and index == who:
            callbacks.append(AtStep(getattr(a, name), signum))

    class Report(keras.callbacks.Callback):  # also reached when a signal makes fit exit
        def on_train_end(self, logs=None):
            write_report(a.out, model, model.history, checkpoint, guard,
                         budget=None if budget is None else budget.stop_reason,
                         preempted_by=checkpoint.preempted_by,
                         trainable=[i for i, v in enumerate(model.variables) if v.trainable],
                         changes=changes)

    return [*callbacks, Report()]
