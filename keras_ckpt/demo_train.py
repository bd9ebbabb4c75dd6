"""A small deterministic training run that the demo and the tests kill and resume.

Usage: python -m keras_ckpt.demo_train DIR OUT.npz [--kill-epoch K | --kill-step S]
       [--data numpy|numpy_noshuffle|tfdata|tfdata_plain] [--save-freq N] [--spe N]
       [--epochs E] [--early-stopping PATIENCE] [--best-on-disk]
       [--daily-budget SECONDS --ledger PATH [--sync-interval S]]
       [--clock-start POSIX --seconds-per-step S] [--poison EPOCH:INDEX] [--rollback]
       [--pause-at-step S] [--preemption exit|return|none] [--announce]
       [--die-in-write N:PHASE]

Trains a model with Dropout and BatchNormalization, Adam with a learning-rate
schedule, seeded (and with op determinism on TensorFlow, the only backend that
imports TensorFlow here), with `ModelCheckpoint(resume=True)` writing into DIR.
`--kill-epoch K` SIGKILLs the process right after epoch K (0-based),
`--kill-step S` after global step S. `--early-stopping P` adds
`EarlyStopping(patience=P, restore_best_weights=True)` (`--best-on-disk` keeps
its best weights in DIR). `--daily-budget` adds a `BudgetStop` charging the
ledger at PATH (real time, or with `--clock-start` a simulated clock that
advances `--seconds-per-step` per trained step). `--data poison` feeds a
resumable `PyDataset` whose batch INDEX of epoch EPOCH (`--poison`) has NaN
targets; `--rollback` adds `TerminateOnNaN(action="rollback")`.
`--pause-at-step S` prints `paused S` after global step S and waits for a line
on stdin (a test sends a signal meanwhile); `--preemption` sets
ModelCheckpoint's `preemption`, and the steps trained are printed at train end
(`trained N`). `--announce` prints `training` when `fit` begins.
`--die-in-write N:PHASE` SIGKILLs the process inside its N-th checkpoint
write (1-based): PHASE `keras` after Keras's part is in the temporary file,
`state` when the file is complete but not yet fsynced or renamed, `rename`
after the rename, before the directory is fsynced. At the end,
every model and optimizer variable, the history and the callbacks' outcomes are
written to OUT.npz.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ckpt  # noqa: E402

__all__ = ["main"]


class Poisoned(keras.utils.PyDataset):
    """Batches of 16 in order; one batch, at (epoch, index), has NaN targets.

    Its epoch count is state that rides in the checkpoints (a tracked data
    helper), so the poison lands on the same batch after a resume.
    """

    def __init__(self, x, y, poison=None):
        super().__init__()
        self.x, self.y, self.poison, self.epoch = x, y, poison, -1
        keras_ckpt.registry.track_data("demo_poisoned", self)

    def __len__(self):
        return len(self.x) // 16

    def __getitem__(self, i):
        y = self.y[i * 16:(i + 1) * 16]
        if self.poison == (self.epoch, i):
            y = np.full_like(y, np.nan)
        return self.x[i * 16:(i + 1) * 16], y

    def on_epoch_begin(self):
        self.epoch += 1

    def get_state(self):
        return {"epoch": self.epoch}

    def set_state(self, state):
        self.epoch = state["epoch"]


class Tick(keras.callbacks.Callback):
    """A simulated clock: each trained step (not a replayed one) takes `seconds`."""

    def __init__(self, start, seconds):
        super().__init__()
        self.now, self.seconds, self.last = start, seconds, None

    def __call__(self):
        return self.now

    def on_train_batch_end(self, batch, logs=None):
        done = int(self.model.optimizer.iterations.numpy())
        if done != self.last:
            self.now += self.seconds
            self.last = done


class Pause(keras.callbacks.Callback):
    """After global step S, says so on stdout and waits for a line on stdin."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            print(f"paused {self.step}", flush=True)
            sys.stdin.readline()

    def on_train_end(self, logs=None):
        print(f"trained {int(self.model.optimizer.iterations.numpy())}", flush=True)


class Announce(keras.callbacks.Callback):
    """Prints `training` when fit begins (a crash harness times its kills from there)."""

    def on_train_begin(self, logs=None):
        print("training", flush=True)


def die_in_write(n: int, phase: str) -> None:
    """Makes the n-th checkpoint write SIGKILL this process at `phase` (see the docstring)."""
    from keras_ckpt import storage_write

    write_group, fsync_path = storage_write._write_group, storage_write._fsync_path
    writes = [0]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def group(*args, **kwargs):
        writes[0] += 1
        if writes[0] == n and phase == "keras":
            die()
        return write_group(*args, **kwargs)

    def fsync(path, directory=False):
        if writes[0] == n and (phase == "rename") == directory:
            die()
        return fsync_path(path, directory)

    if phase not in ("keras", "state", "rename"):
        raise SystemExit(f"unknown write phase {phase!r}")
    storage_write._write_group, storage_write._fsync_path = group, fsync


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
    p.add_argument("--min-delta", type=float, default=0.05)
    p.add_argument("--daily-budget", type=float)
    p.add_argument("--ledger")
    p.add_argument("--sync-interval", type=float, default=0.5)
    p.add_argument("--clock-start", type=float)
    p.add_argument("--seconds-per-step", type=float, default=60.0)
    p.add_argument("--poison")
    p.add_argument("--rollback", action="store_true")
    p.add_argument("--pause-at-step", type=int)
    p.add_argument("--preemption", default="auto")
    p.add_argument("--announce", action="store_true")
    p.add_argument("--die-in-write")
    a = p.parse_args(argv)

    if a.die_in_write:
        n, phase = a.die_in_write.split(":")
        die_in_write(int(n), phase)
    keras.utils.set_random_seed(7)
    if keras.backend.backend() == "tensorflow":  # TensorFlow is imported only where used
        import tensorflow as tf

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
        save_freq=save_freq, resume=True,
        preemption=None if a.preemption == "none" else a.preemption)]
    if a.pause_at_step is not None:
        callbacks.insert(0, Pause(a.pause_at_step))
    if a.announce:
        callbacks.insert(0, Announce())
    clock = None
    if a.clock_start is not None:
        clock = Tick(a.clock_start, a.seconds_per_step)
        callbacks.insert(0, clock)
    stop = None
    if a.early_stopping is not None:
        stop = keras_ckpt.EarlyStopping(
            patience=a.early_stopping, restore_best_weights=True, min_delta=a.min_delta,
            best_weights_path=os.path.join(a.directory, "best.weights.h5") if a.best_on_disk
            else None)
        callbacks.append(stop)
    budget = None
    if a.daily_budget is not None:
        budget = keras_ckpt.BudgetStop(daily_budget=a.daily_budget, ledger=a.ledger,
                                       sync_interval=a.sync_interval, verbose=0, clock=clock,
                                       timezone="Europe/Berlin" if clock else "UTC")
        callbacks.append(budget)
    guard = None
    if a.rollback:
        guard = keras_ckpt.TerminateOnNaN(action="rollback", verbose=0)
        callbacks.append(guard)
    if a.kill_epoch is not None or a.kill_step is not None:
        callbacks.append(Kill(a.kill_epoch, a.kill_step))

    fit = dict(epochs=a.epochs, validation_data=val, callbacks=callbacks, verbose=0)
    if a.data == "numpy":
        history = model.fit(x, y, batch_size=16, shuffle=True, **fit)
    elif a.data == "numpy_noshuffle":
        history = model.fit(x, y, batch_size=16, shuffle=False, **fit)
    elif a.data in ("tfdata", "tfdata_plain"):
        import tensorflow as tf

        ds = tf.data.Dataset.from_tensor_slices((x, y))
        if a.data == "tfdata":
            ds = ds.apply(keras_ckpt.data.EpochShuffle(96, seed=3))
        else:  # what users write today: reshuffles every epoch, state inside TF
            ds = ds.shuffle(96, seed=3)
        history = model.fit(ds.batch(16), **fit)
    elif a.data == "poison":
        poison = tuple(int(v) for v in a.poison.split(":")) if a.poison else None
        history = model.fit(Poisoned(x, y, poison), shuffle=False, **fit)
    else:
        raise SystemExit(f"unknown --data {a.data}")

    arrays = {f"model/{i}": v.numpy() for i, v in enumerate(model.variables)}
    arrays.update({f"optimizer/{i}": v.numpy() for i, v in enumerate(model.optimizer.variables)})
    checkpoint = next(c for c in callbacks if isinstance(c, keras_ckpt.ModelCheckpoint))
    outcome = {"epoch": history.epoch, "history": history.history,
               "preempted_by": checkpoint.preempted_by}
    if budget is not None:
        outcome.update(budget_stop_reason=budget.stop_reason, budget_session=budget.session,
                       budget_stopped_at=budget.stopped_at, budget_checkpoint=budget.checkpoint)
    if guard is not None:
        outcome.update(nan_events=[{**e.__dict__, "value": str(e.value)} for e in guard.events])
    resumed = checkpoint.resumed_from
    outcome.update(resumed_from=None if resumed is None else
                   {"path": resumed.path, "epoch": resumed.epoch, "step": resumed.step,
                    "epoch_complete": resumed.epoch_complete})
    if stop is not None:
        outcome.update(stopped_epoch=stop.stopped_epoch, best_epoch=stop.best_epoch,
                       stop_reason=stop.stop_reason, min_delta=stop.min_delta)
    arrays["history"] = np.frombuffer(json.dumps(outcome).encode(), dtype=np.uint8)
    np.savez(a.out, **arrays)


if __name__ == "__main__":
    main()
