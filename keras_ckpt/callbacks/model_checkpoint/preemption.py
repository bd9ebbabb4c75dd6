"""Preemption: a SIGTERM/SIGINT during `fit` becomes a checkpoint of that step and a stop.

The signal handler (`keras_ckpt.preemption.SignalCatcher`) only records the
signal. Here, on the training thread, the next train batch end sees it:
the step is saved (on TensorFlow at once; on JAX and torch, whose batch hooks
may run on Keras's thread pool, at the next synchronous hook), training
stops, every callback's `on_train_end` runs, and the session's close exits
with 128 + the signal number (or `fit` returns, `preemption="return"`).
With several workers the signal is agreed on by all (one all-reduce per
batch end), so all stop at the same step with the same signal.
"""

from __future__ import annotations

import signal
from typing import Any

import keras
import numpy as np

from keras_ckpt import registry
from keras_ckpt.callbacks.model_checkpoint.saver import global_step
from keras_ckpt.keras_compat import callback_model, print_msg
from keras_ckpt.preemption import SignalCatcher, exit_status

__all__ = ["Preemption", "logs_dict"]


def logs_dict(logs: Any) -> dict:
    """The logs as Python floats ({} when they cannot be read that way)."""
    if not logs:
        return {}
    try:
        return {k: float(keras.ops.convert_to_numpy(v)) for k, v in dict(logs).items()}
    except (TypeError, ValueError):
        return {}


class Preemption:
    """Turns a recorded signal into a save and a stop, for one ModelCheckpoint (`owner`)."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.catcher = SignalCatcher(owner.options.signal_numbers)
        self.preempted_by: str | None = None
        self._announced = False

    def install(self, session: Any) -> None:
        self.preempted_by = None
        self._announced = False
        self.catcher.install()
        session.on_close("signal handlers", self.catcher.restore)

    # ------------------------------------------------------------ is a stop asked for?
    def pending(self) -> bool:
        """Whether a stop signal is pending: here, or (several workers) on any worker.

        With several workers every one calls this at the same hooks (train
        batch end, epoch end), and a worker the signal did not reach adopts
        it, so all stop at the same step. Validation does not look: a signal
        that arrives there is taken at the epoch's end.
        """
        catcher, workers = self.catcher, self.owner.workers
        if workers is not None:
            # One all-reduce: in base (workers + 1), digit k counts the workers
            # that got the k-th configured signal; the first one present wins.
            base = workers.count + 1
            mine = 0 if catcher.pending is None else base ** catcher.signals.index(
                catcher.pending)
            total = int(round(workers.sum(mine)))
            for signum in catcher.signals:
                if total % base:
                    catcher.pending = signum
                    break
                total //= base
        if catcher.pending is not None and not self._announced:
            self._announced = True
            if self.owner.options.verbose > 0:
                print_msg(f"\nModelCheckpoint: {signal.Signals(catcher.pending).name} "
                          "received; saving and stopping after the current step.")
        return catcher.pending is not None

    def waiting(self) -> bool:
        """A signal is pending here and no stop was made for it yet (no collective)."""
        return self.catcher.pending is not None and self.preempted_by is None

    # ------------------------------------------------------------ hooks
    def train_batch_end(self, done: int, logs: Any) -> bool:
        """Stops for a pending signal after `done` steps of the epoch; True when it did."""
        owner = self.owner
        owner.fit.last_logs = logs
        if not (self.pending() and self.preempted_by is None):
            return False
        if owner.hooks_see_state:
            self.preempt(logs or {}, steps_in_epoch=done)
        else:
            self.defer(logs)
        return True

    def test_batch_end(self) -> None:
        owner = self.owner
        fit = owner.fit
        if not (fit.in_fit and owner.workers is None and self.waiting()
                and fit.train_metrics is not None):
            return
        # The epoch's steps are all done; stop validating and save them.
        model = callback_model(owner)
        model.stop_evaluating = True
        if not owner.hooks_see_state:  # possibly on Keras's callback thread
            self.defer(fit.last_logs)
            return
        steps = global_step(owner.model) - fit.epoch_start_step
        self.preempt(logs_dict(fit.last_logs), steps_in_epoch=steps, metrics=fit.train_metrics)

    def defer(self, logs: Any) -> None:
        """Stops training from a batch hook that must not touch the model's state.

        Possibly on Keras's callback thread (JAX, torch): it only flags the
        stop. The checkpoint is written at the next synchronous hook, with the
        steps actually trained by then (`save_deferred`).
        """
        owner = self.owner
        model = callback_model(owner)
        with owner.hook_lock:  # the first stop's logs, whichever pool thread comes first
            if owner.fit.deferred is None:
                owner.fit.deferred = dict(logs or {})
        registry.set_cut_short(model, owner.fit.epoch)
        model.stop_training = True

    def save_deferred(self, metrics: list[np.ndarray] | None = None) -> None:
        owner = self.owner
        fit = owner.fit
        logs, fit.deferred = logs_dict(fit.deferred), None
        steps = global_step(owner.model) - fit.epoch_start_step
        owner.saver.save(logs, steps_in_epoch=steps, force=True, metrics=metrics)
        if self.waiting():
            self.stop(f"at epoch {fit.epoch + 1}, step {steps}")

    def preempt(self, logs: dict, steps_in_epoch: int,
                metrics: list[np.ndarray] | None = None) -> None:
        owner = self.owner
        # The epoch is cut short even at its last step: the checkpoint holds
        # it before validation, and a resume validates and ends it.
        registry.set_cut_short(owner.model, owner.fit.epoch)
        owner.saver.save(logs, steps_in_epoch=steps_in_epoch, force=True, metrics=metrics)
        self.stop(f"at epoch {owner.fit.epoch + 1}, step {steps_in_epoch}")

    def stop(self, where: str) -> None:
        """Stops training for the pending signal; the session's close then exits (or not)."""
        owner = self.owner
        signum = self.catcher.pending
        name = signal.Signals(signum).name
        self.preempted_by = name
        owner.model.stop_training = True
        saved = (f"checkpoint {owner.last_saved_path}" if owner.fit.saved_at
                 else "nothing saved")
        exiting = owner.options.preemption == "exit"
        then = f"exiting with status {exit_status(signum)}" if exiting else "fit returns"
        print_msg(f"\nModelCheckpoint: stopped by {name} {where}; {saved}; {then}.")
        if exiting:
            registry.current_fit(owner.model).exit_status = exit_status(signum)
