"""What one ModelCheckpoint knows about the fit in progress (reset at every train begin)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

__all__ = ["FitState", "SavedAt"]


class SavedAt(NamedTuple):
    """Where this fit last saved: its session, the global step, the path, at an epoch end."""

    session: Any
    step: int
    path: str | None
    epoch_end: bool


@dataclasses.dataclass
class FitState:
    """Per-fit counters shared by the callback's collaborators.

    Attributes:
        epoch: the 0-based epoch in progress.
        epoch_start_step: the global step at which it began.
        last_save_step, last_save_time: of the last save (policies count from them).
        resume_step: steps of the resumed epoch trained before the interruption.
        pending_epochs: history epochs to put back into Keras's `History`.
        epoch_rng, epoch_data_states: RNG and data-helper states at epoch start
            (a mid-epoch checkpoint replays the epoch's data order from them).
        epoch_counters, counter_step, trained_calls, replay_calls: for the
            counter repair of a save after an exception.
        last_logs: the last train step's logs.
        train_metrics: the epoch's training metrics, kept at validation begin.
        saved_at: the last save of this fit (`SavedAt`).
        deferred: logs of a stop whose save waits for a synchronous hook.
        written: paths this callback wrote in this fit.
        in_fit: between train begin and the session's close.
        fits: the fits this callback began (`next_fit`).
        rng_differs_said: the processes' differing RNG states were warned of.
    """

    epoch: int = 0
    epoch_start_step: int = 0
    last_save_step: int = 0
    last_save_time: float = 0.0
    fields_unchecked: bool = False
    resume_step: int = 0
    pending_epochs: list[int] | None = None
    epoch_rng: Any = None
    epoch_data_states: dict = dataclasses.field(default_factory=dict)
    epoch_counters: list[np.ndarray] | None = None
    counter_step: list[np.ndarray] | None = None
    trained_calls: int = 0
    replay_calls: int = 0
    last_logs: Any = None
    train_metrics: list[np.ndarray] | None = None
    saved_at: SavedAt | None = None
    deferred: dict | None = None
    written: set[str] = dataclasses.field(default_factory=set)
    in_fit: bool = False
    fits: int = 0
    rng_differs_said: bool = False

    def next_fit(self, step_now: int, fields_unchecked: bool) -> FitState:
        """The counters of a new fit, which begins at global step `step_now`.

        An integer `save_freq` counts steps from the callback's last save, or
        from where its first fit began (not from step 0 of a model trained
        before), and across its fits, as Keras counts the batches seen since
        the last save. A resume then sets `last_save_step` from the checkpoint.
        """
        return FitState(fields_unchecked=fields_unchecked, fits=self.fits + 1,
                        last_save_step=self.last_save_step if self.fits else step_now)
