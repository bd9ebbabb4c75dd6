"""`save_on_exception`: a checkpoint of the last completed step before an error propagates.

A step that fails inside its graph (a bad record: the data fetch fails) can
still have run the parts that do not depend on the data: the optimizer's step
counter and the seed generators advance, the weights do not. Those counters
are read at each epoch's start and after its first trained step; a failure
puts them back where the last completed step left them. TensorFlow only: JAX
and torch fetch the batch before the step starts (and JAX detaches the
variables while it trains).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from keras_ckpt import keras_compat, registry
from keras_ckpt.callbacks.model_checkpoint.preemption import logs_dict
from keras_ckpt.callbacks.model_checkpoint.saver import global_step
from keras_ckpt.keras_compat import print_msg
from keras_ckpt.warn import warn

__all__ = ["ExceptionSave"]


class ExceptionSave:
    """Listens to the fit's step functions for one ModelCheckpoint (`owner`)."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner

    def install(self, session: Any) -> None:
        session.guards.on_result(self._on_result)
        session.guards.on_step_error(self._on_error)

    # ------------------------------------------------------------ counters
    def _counters(self) -> list:
        model = self.owner.model
        optimizer = getattr(model, "optimizer", None)
        found = [v for v in model.variables if v.path.endswith("seed_generator_state")]
        if optimizer is not None and getattr(optimizer, "built", False):
            found.append(keras_compat.step_counter(optimizer))
        return found

    def read_counters(self) -> list[np.ndarray]:
        return [np.array(keras.ops.convert_to_numpy(v)) for v in self._counters()]

    def epoch_begin(self) -> None:
        """Reads the counters at the epoch's start (TensorFlow fetches inside the step)."""
        owner, fit = self.owner, self.owner.fit
        fit.epoch_counters = self.read_counters() if owner.hooks_see_state else None
        fit.trained_calls = 0
        # The calls a resume replays through the step function (`Replay`), if any.
        fit.replay_calls = getattr(getattr(owner.fit_session.guards, "replay", None),
                                   "remaining", 0)

    def _on_result(self, name: str, result: Any) -> None:
        if name != "train_function":
            return
        fit = self.owner.fit
        fit.last_logs = result
        if fit.replay_calls > 0:  # a resume consuming batches it had trained on
            fit.replay_calls -= 1
            return
        fit.trained_calls += 1
        if (fit.trained_calls == 1 and fit.counter_step is None
                and fit.epoch_counters is not None):
            now, start = self.read_counters(), fit.epoch_counters
            if len(now) == len(start):
                fit.counter_step = [a - b for a, b in zip(now, start, strict=True)]

    def _repair_counters(self) -> None:
        fit = self.owner.fit
        start = fit.epoch_counters
        counters = self._counters()
        if start is None or len(start) != len(counters):
            return
        if fit.trained_calls and fit.counter_step is None:
            return
        steps = fit.counter_step or [0 * a for a in start]
        expected = [a + fit.trained_calls * d for a, d in zip(start, steps, strict=True)]
        for variable, value in zip(counters, expected, strict=True):
            if not np.array_equal(keras.ops.convert_to_numpy(variable), value):
                variable.assign(value)

    # ------------------------------------------------------------ the save
    def _on_error(self, name: str, error: BaseException) -> None:
        owner, fit = self.owner, self.owner.fit
        if not fit.in_fit:
            return
        try:
            if name == "train_function":
                self._repair_counters()
            steps = global_step(owner.model) - fit.epoch_start_step
            spe = int(getattr(owner.model, "steps_per_execution", 1) or 1)
            where = f"epoch {fit.epoch + 1}, step {steps}"
            if steps % spe:
                warn(
                    f"ModelCheckpoint: {type(error).__name__} at {where}, inside an execution of "
                    f"steps_per_execution={spe} steps; no checkpoint can be resumed from there. "
                    "The previous checkpoints stay as they are.")
                return
            if owner.workers is not None:
                # A snapshot is a collective: the other workers, still in a
                # step, would never join it. The last periodic save resumes.
                warn(
                    f"ModelCheckpoint: {type(error).__name__} at {where}; with several workers "
                    "no checkpoint is written after an error. The previous checkpoints stay as "
                    "they are.")
                return
            print_msg(f"\nModelCheckpoint: {type(error).__name__} at {where}; saving the last "
                      "completed step before it propagates.")
            registry.set_cut_short(owner.model, fit.epoch)
            owner.saver.save(logs_dict(fit.last_logs), steps_in_epoch=steps, force=True,
                             metrics=fit.train_metrics)
            owner.saver.wait()
        except Exception as e:  # never hide the original error
            warn(f"ModelCheckpoint: could not save after {type(error).__name__}: {e}")
