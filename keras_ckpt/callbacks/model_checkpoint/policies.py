"""When ModelCheckpoint saves: small decision policies, composed like retention policies.

- `EveryNSteps(n)`: a training step `n` steps after the last save (counted in
  steps, also with `steps_per_execution`, where Keras calls the batch hook
  every N steps with the last step's index).
- `EveryInterval(seconds, clock)`: a training step at least `seconds` after
  the last save.
- `EveryEpoch()`: each epoch end.
- `AutoFrequency` (`save_freq="auto"`, its own module): every `n` steps, `n`
  chosen from the measured cost of a save and of a step.
A policy's `due(global_step, last_save_step, last_save_time)` says whether a
save is due now (called after every training step for the batch-level ones).

- `BestOnly(monitor)`: a filter over the others: only a state whose monitored
  value improves on the best saved so far. Its decision can be undone when
  the write it allowed fails, so the best value is always one a file holds.

Stops (a sibling's, a signal's, an exception's) are forced requests: they
bypass the policies (see `Saver.save(force=True)`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from keras_ckpt.callbacks.model_checkpoint.auto_freq import (
    DEFAULT_MAX_LOST,
    DEFAULT_OVERHEAD,
    AutoFrequency,
)
from keras_ckpt.monitor import Monitor

__all__ = ["EveryNSteps", "EveryInterval", "EveryEpoch", "BestOnly",
           "policies_for", "bind_retention"]


@dataclasses.dataclass(frozen=True)
class EveryNSteps:
    """Due `steps` training steps after the last save."""

    steps: int
    batch_level = True

    def due(self, global_step: int, last_save_step: int, last_save_time: float) -> bool:
        return global_step - last_save_step >= self.steps


@dataclasses.dataclass(frozen=True)
class EveryInterval:
    """Due at the first step `seconds` after the last save, on `clock`."""

    seconds: float
    clock: Callable[[], float]
    batch_level = True

    def due(self, global_step: int, last_save_step: int, last_save_time: float) -> bool:
        return self.clock() - last_save_time >= self.seconds


@dataclasses.dataclass(frozen=True)
class EveryEpoch:
    """Due at every epoch end."""

    batch_level = False

    def due(self, global_step: int, last_save_step: int, last_save_time: float) -> bool:
        return True


class BestOnly:
    """Lets a save through only when the monitored value improves on the best saved.

    `decide` updates the comparator tentatively and returns a token; `undo`
    with that token puts the comparator back (a failed write).
    """

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def decide(self, logs: dict, epoch: int, step: int | None) -> tuple[bool | None, Any]:
        """(improved, undo token); improved is None when the logs lack the monitor."""
        current = self.monitor.get_value(logs)
        if current is None:
            return None, None
        before = self.monitor.get_state()
        improved = self.monitor.update(current, epoch, step).improved
        return improved, before

    def undo(self, token: Any) -> None:
        if token is not None:
            self.monitor.set_state(token)


def bind_retention(retention: list, monitor: Monitor, model: Any, best_only: bool) -> None:
    """Gives `KeepBest` policies without a monitor the checkpoint's monitor and direction."""
    if best_only or any(getattr(p, "monitor", "") is None for p in retention):
        monitor.resolve(model)
    for policy in retention:
        if hasattr(policy, "monitor") and policy.monitor is None:
            policy.monitor = monitor.monitor
            if policy.mode is None:
                policy.mode = monitor.direction


def policies_for(save_freq: str | int, save_interval: float | None,
                 clock: Callable[[], float], save_overhead: float | None = None) -> list:
    """The decision policies of ModelCheckpoint's `save_freq` and `save_interval`.

    With `save_freq="auto"`, `save_interval` bounds the automatic interval (the
    most training a kill may lose; an hour without it).
    """
    if save_freq == "auto":
        return [AutoFrequency(DEFAULT_OVERHEAD if save_overhead is None else save_overhead,
                              DEFAULT_MAX_LOST if save_interval is None else save_interval,
                              clock)]
    policies: list = [EveryEpoch()] if save_freq == "epoch" else [EveryNSteps(int(save_freq))]
    if save_interval is not None:
        policies.append(EveryInterval(float(save_interval), clock))
    return policies
