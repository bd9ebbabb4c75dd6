"""Keras's own stateful callbacks ride in keras-ckpt's checkpoints.

A `fit` that uses keras-ckpt's `ModelCheckpoint` beside Keras's callbacks gets
their state saved and restored with the rest of the training state:

| Keras callback | what rides along |
| --- | --- |
| `ReduceLROnPlateau` | `wait`, `cooldown_counter`, `best` (the learning rate is the optimizer's) |
| `EarlyStopping` | `wait`, `stopped_epoch`, `best`, `best_epoch`, `best_weights` |
| `ModelCheckpoint` | `best`; with `save_freq=<int>` its batch counters, set to the |
| | uninterrupted run's at the resume point (`save_freq_counters`) |
| `LearningRateScheduler` | nothing; not applied twice to a resumed epoch (its rate is restored) |
| `CSVLogger` | nothing: its file is its state; `append=False` is warned (`lost_on_resume`), |
| | and so are rows written after the checkpoint (`rows_after`) |
| `SwapEMAWeights` | whether the model holds the EMA weights (swapped in at an epoch end) |
| `TensorBoard` | the step of its batch summaries: the batch ends before the checkpoint |

Each one's epoch end runs once per epoch: a checkpoint written at an epoch
end runs it first ("settles" it) wherever the callback stands in the list, so
the checkpoint holds its state after the epoch. Restored states are applied
at the first epoch begin, after the callbacks' own `on_train_begin` reset.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from keras_ckpt import keras_compat

__all__ = ["attach", "KerasCallbackState", "lost_on_resume", "rows_after", "at_next_epoch",
           "save_freq_counters"]


def _counters() -> dict[type, tuple[str, ...]]:
    import keras

    return {keras.callbacks.ReduceLROnPlateau: ("wait", "cooldown_counter", "best"),
            keras.callbacks.EarlyStopping: ("wait", "stopped_epoch", "best", "best_epoch"),
            keras.callbacks.LearningRateScheduler: (),  # its epoch end writes the logs
            keras.callbacks.SwapEMAWeights: keras_compat.SWAP_EMA_STATE}


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    number = float(value)
    return number if math.isfinite(number) else {"float": repr(number)}


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "float" in value:
        return float(value["float"])
    return value


class KerasCallbackState:
    """The state of one Keras callback of the fit, under `keras.<ClassName>`."""

    def __init__(self, callback: Any, names: tuple[str, ...], session: Any) -> None:
        self.callback = callback
        self.names = names
        self.state_key = f"keras.{type(callback).__name__}"
        self._session = weakref.ref(session)
        self._ran: int | None = None
        self._stopped_epoch = 0  # a restored Keras EarlyStopping's (`finished`)
        original = callback.on_epoch_end

        def on_epoch_end(epoch: int, logs: dict | None = None) -> Any:
            if self._ran == epoch:
                return None  # settled before a checkpoint of this epoch's end
            self._ran = epoch
            return original(epoch, logs)

        keras_compat.set_instance_attr(callback, "on_epoch_end", on_epoch_end)
        session.on_close(f"{self.state_key} epoch end",
                         lambda: callback.__dict__.pop("on_epoch_end", None))

    def settle_epoch_end(self, epoch: int, logs: dict | None) -> None:
        """Runs the callback's epoch end now (once), before a checkpoint captures it."""
        self.callback.on_epoch_end(epoch, logs)

    def get_state(self) -> dict:
        state = {name: _encode(getattr(self.callback, name, None)) for name in self.names}
        weights = getattr(self.callback, "best_weights", None)  # Keras's EarlyStopping
        if weights is not None:
            state["n_best"] = len(weights)
            for i, array in enumerate(weights):
                state[f"best_{i:05d}"] = np.asarray(array)
        return state

    def finished(self) -> str | None:
        """Why a resume must train no further (Keras's `EarlyStopping` had stopped), or None."""
        import keras

        if type(self.callback) is not keras.callbacks.EarlyStopping or self._stopped_epoch <= 0:
            return None
        return (f"keras.callbacks.EarlyStopping already stopped training after epoch "
                f"{self._stopped_epoch + 1}; resuming trains no further.")

    def set_state(self, state: dict) -> None:
        """Applied at the first epoch begin (after the callback's `on_train_begin` reset), or
        before the fit's `on_train_end` where no epoch begins (nothing left to train)."""
        self._stopped_epoch = int(_decode(state.get("stopped_epoch")) or 0)

        def apply() -> None:
            for name in self.names:
                if name in state:
                    setattr(self.callback, name, _decode(state[name]))
            n = int(state.get("n_best", 0) or 0)
            if n:
                self.callback.best_weights = [state[f"best_{i:05d}"] for i in range(n)]

        at_next_epoch(self._session(), apply)


class TensorBoardState(KerasCallbackState):
    """`TensorBoard`'s batch-summary step, which it counts from 0 each fit: the checkpoint
    holds the batch ends so far (the session's count, whatever the callbacks' order); a
    resumed fit's count starts there, less the trained calls it replays."""

    def __init__(self, callback: Any, session: Any) -> None:
        super().__init__(callback, (), session)
        self.start = 0

    def get_state(self) -> dict:
        session = self._session()
        return {"batch_ends": self.start + (session.batch_ends if session is not None else 0)}

    def set_state(self, state: dict) -> None:
        session = self._session()

        def apply() -> None:
            replay = getattr(getattr(session, "guards", None), "replay", None)
            self.start = int(state.get("batch_ends", 0)) - getattr(replay, "remaining", 0)
            ends = session.batch_ends if session is not None else 0
            setattr(self.callback, keras_compat.TENSORBOARD_STEP, self.start + ends)

        at_next_epoch(session, apply)


class ModelCheckpointState(KerasCallbackState):
    """Keras's `ModelCheckpoint`: its `best`; with `save_freq=<int>`, its batch counters, which
    a resumed fit sets to the uninterrupted run's at the resume point (they follow from the
    batch ends since the fit's first epoch), so it saves at the same steps (where a resume
    replays a trained call, it saves that step's state again, as it did)."""

    def __init__(self, callback: Any, session: Any) -> None:
        super().__init__(callback, ("best",), session)

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        session, callback = self._session(), self.callback
        model = getattr(session, "model", None)  # (Keras's fit replaces its argument later)
        first = int((keras_compat.fit_arguments(model) or {}).get("initial_epoch") or 0)

        def apply() -> None:
            point = getattr(session, "resume_point", None)
            steps = (getattr(callback, "params", None) or {}).get("steps")
            if point is None or not isinstance(callback.save_freq, int) or \
                    not isinstance(steps, int):
                return  # (steps unknown: warned at train begin, `lost_on_resume`)
            spe = max(1, int(getattr(model, "steps_per_execution", 1) or 1))
            # Calls a resume replays (the checkpoint's last; see resume._skip_trained) show
            # their batch ends to Keras's callbacks again: counted from before them.
            replay = getattr(getattr(session, "guards", None), "replay", None)
            step = point[1] if replay is None else \
                max(0, -(-point[1] // spe) - replay.remaining) * spe
            counters = save_freq_counters(callback.save_freq, steps, spe, point[0] - first,
                                          step)
            for name, value in zip(keras_compat.MODEL_CHECKPOINT_COUNTERS, counters,
                                   strict=True):
                setattr(callback, name, value)

        at_next_epoch(session, apply)


def save_freq_counters(save_freq: int, steps: int, spe: int, epochs: int, step: int
                       ) -> tuple[int, int | None]:
    """Keras `ModelCheckpoint(save_freq=...)`'s counters (batches since its last save, the
    last batch index its hook saw) after `epochs` whole epochs of `steps` and `step` batches
    of the next, with batch hooks every `spe` steps, as its `_should_save_on_batch` counts."""
    if spe == 1:  # one at a time: a remainder
        last = step - 1 if step else (steps - 1 if epochs else None)
        return (epochs * steps + step) % save_freq, last
    since, last, after = 0, None, {}
    for epoch in range(epochs + 1):
        if epoch < epochs and since in after:  # an epoch's effect depends on `since` alone
            since, last = after[since], steps - 1
            continue
        before = since
        for end in range(spe, (steps if epoch < epochs else step) + spe, spe):
            batch = min(end, steps) - 1
            if epoch == epochs and batch >= step:
                break
            since += batch + 1 if last is None or batch <= last else batch - last
            since, last = (0 if since >= save_freq else since), batch
        if epoch < epochs:
            after[before] = since
    return since, last


def at_next_epoch(session: Any, apply: Callable[[], None]) -> None:
    """Runs `apply` at the session's next epoch begin (after every callback's `on_train_begin`
    reset; before `on_train_end` where no epoch begins), or now without an open session."""
    if session is None or session.closed:
        apply()
    else:
        session.before_epoch.append(apply)


def attach(session: Any) -> list[KerasCallbackState]:
    """The state adapters of the Keras callbacks in the session's fit (wrapping their hooks)."""
    import keras

    from keras_ckpt.fit.protocol import StatefulCallback

    callbacks = session.callback_list()
    if callbacks is None:
        return []
    counters = _counters()
    adapters = []
    for callback in callbacks.callbacks:
        if isinstance(callback, StatefulCallback):
            continue
        names = next((n for cls, n in counters.items() if type(callback) is cls), None)
        if type(callback) is keras.callbacks.ModelCheckpoint:
            adapters.append(ModelCheckpointState(callback, session))
        elif names is not None:
            adapters.append(KerasCallbackState(callback, names, session))
        elif type(callback) is keras.callbacks.TensorBoard:
            adapters.append(TensorBoardState(callback, session))
        if type(callback) is keras.callbacks.LearningRateScheduler:
            _apply_schedule_once(callback, session)
    return adapters


def _apply_schedule_once(scheduler: Any, session: Any) -> None:
    """After a mid-epoch resume, the resumed epoch's learning rate is the checkpoint's."""
    original = scheduler.on_epoch_begin

    def on_epoch_begin(epoch: int, logs: dict | None = None) -> Any:
        live = session_ref()
        if live is not None and live.resumed_mid_epoch == epoch:
            live.resumed_mid_epoch = None
            return None
        return original(epoch, logs)

    session_ref = weakref.ref(session)
    keras_compat.set_instance_attr(scheduler, "on_epoch_begin", on_epoch_begin)
    session.on_close("LearningRateScheduler epoch begin",
                     lambda: scheduler.__dict__.pop("on_epoch_begin", None))


def lost_on_resume(session: Any) -> list[str]:
    """What the Keras callbacks of the session's fit lose in a resume, each with what to do."""
    import keras

    callbacks = session.callback_list()
    problems = []
    for callback in callbacks.callbacks if callbacks is not None else []:
        if type(callback) is keras.callbacks.CSVLogger and not callback.append:
            problems.append(
                f"keras.callbacks.CSVLogger(append=False) rewrites {callback.filename} at "
                "train begin: after a resume it holds the resumed epochs' rows only. Pass "
                "append=True.")
        every = getattr(callback, "save_freq", None)
        steps = (getattr(callback, "params", None) or {}).get("steps")
        if type(callback) is keras.callbacks.ModelCheckpoint and isinstance(every, int) \
                and not isinstance(steps, int):
            problems.append(
                f"keras.callbacks.ModelCheckpoint(save_freq={every}) counts batches from 0 in "
                "every fit, and Keras does not know an epoch's steps here, so its count at the "
                "resume point cannot be worked out: after a resume it saves at other steps "
                "than the uninterrupted run would. Save with keras_ckpt.ModelCheckpoint, or "
                "give fit steps_per_epoch.")
    return problems


def rows_after(session: Any, epoch: int) -> list[str]:
    """`CSVLogger(append=True)` files whose last rows are of epoch `epoch` or later (written
    after the checkpoint a resume starts from: the resumed run writes them again)."""
    import keras

    callbacks = session.callback_list()
    problems = []
    for callback in callbacks.callbacks if callbacks is not None else []:
        if type(callback) is not keras.callbacks.CSVLogger or not callback.append:
            continue
        try:
            with open(callback.filename, "rb") as f:
                f.seek(max(0, f.seek(0, 2) - (1 << 16)))  # its tail: the newest rows
                tail = f.read().decode("utf-8", "replace").splitlines()[1:]  # (a part line)
        except OSError:
            continue
        later = 0
        for line in reversed(tail):
            first = line.split(getattr(callback, "sep", ","), 1)[0]
            if not first.isdigit() or int(first) < epoch:
                break
            later += 1
        if later:
            problems.append(
                f"keras.callbacks.CSVLogger(append=True): {callback.filename} ends with "
                f"{later} row(s) of epoch {epoch + 1} on, written after the checkpoint this run "
                "resumes from; the resumed run writes those epochs again. Delete them to keep "
                "one row an epoch.")
    return problems
