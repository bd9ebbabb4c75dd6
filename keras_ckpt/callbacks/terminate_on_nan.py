"""`TerminateOnNaN`: catch non-finite training, keep the last good state, optionally roll back."""

from __future__ import annotations

import dataclasses

import keras

from keras_ckpt import keras_compat, manager, registry
from keras_ckpt import state as state_lib
from keras_ckpt.callbacks.base import StatefulCallback, non_finite_logs, print_msg
from keras_ckpt.callbacks.model_checkpoint import ModelCheckpoint
from keras_ckpt.fit.protocol import steps_done
from keras_ckpt.jsonsafe import decode_float, encode_float
from keras_ckpt.validation import check_bool, check_choice, check_number

__all__ = ["TerminateOnNaN", "NaNEvent"]

ACTIONS = ("stop", "raise", "rollback")
ROLLBACK_SOURCES = ("memory", "checkpoint")


@dataclasses.dataclass
class NaNEvent:
    """One detection: where, what, and what was done.

    Attributes:
        epoch: 0-based epoch.
        step: step within the epoch (1-based count of steps done), or None at
            epoch end.
        key: the log key (`loss`, `val_loss`, ...) or the variable path.
        value: the offending value (None for a variable).
        action: `"stop"`, `"raise"`, `"rollback"`, or `"stop"` after the
            retries ran out.
    """

    epoch: int
    step: int | None
    key: str
    value: float | None
    action: str

    def describe(self) -> str:
        """A one-line description for messages."""
        where = f"epoch {self.epoch + 1}" + (f", step {self.step}" if self.step else " (end)")
        what = f"{self.key} = {self.value}" if self.value is not None else f"{self.key} has NaN/Inf"
        return f"{where}: {what}"


class TerminateOnNaN(StatefulCallback):
    """Stops (or raises, or rolls back) when training produces NaN or Inf.

    A drop-in for `keras.callbacks.TerminateOnNaN`: with defaults it stops
    training gracefully at the first non-finite value, and `raise_error=True`
    raises instead. Its messages begin with Keras's words, for code that
    matches on them: the RuntimeError with `"NaN or Inf loss encountered at
    batch B."`, the stop message with `"Batch B: Invalid loss, terminating
    training."` (B the 0-based batch index in the epoch). Beyond Keras:

    - it checks every numeric value in the logs (loss, per-output losses,
      metrics) after each training step, and the validation values at epoch
      end; `check_weights` also checks that every model variable is finite;
    - while the state is not finite, a keras-ckpt `ModelCheckpoint` in the same
      fit writes nothing: the newest and the best checkpoints stay the last
      finite state, and nothing saved is deleted;
    - `action="rollback"` restores the last finite state (an in-memory
      snapshot taken every `snapshot_every` steps and at each epoch end, or the
      newest valid checkpoint), optionally scales the learning rate by
      `lr_factor`, and continues; after `max_retries` rollbacks it stops;
    - every event (epoch, step, key, action) is printed, kept in `events`,
      and written into each checkpoint's metadata.

    Per step it only reads the logs Keras already converted to Python
    numbers: no device sync (except the opt-in weight check and snapshots).

    Args:
        raise_error: Keras's switch: raise a RuntimeError instead of stopping.
        action: `"stop"`, `"raise"` or `"rollback"`; by default from
            `raise_error`.
        check_weights: None, `"epoch"` (check every variable at epoch end) or
            an integer N (every N steps).
        rollback_from: `"memory"` or `"checkpoint"` (the newest valid
            checkpoint of a keras-ckpt ModelCheckpoint in the same fit).
        snapshot_every: with `rollback_from="memory"`, also snapshot every
            this many steps (a snapshot is always taken at train begin and at
            each finite epoch end). A snapshot is only known to be finite: a
            run already diverging (huge but finite weights) may be snapshotted
            and rolled back to; frequent snapshots make that likelier.
        lr_factor: after a rollback, multiply the learning rate by this
            (0 < lr_factor <= 1); needs a float learning rate, not a schedule.
        max_retries: rollbacks allowed before stopping.
        verbose: 0 or 1.

    Example:
    ```python
    guard = keras_ckpt.TerminateOnNaN(action="rollback", lr_factor=0.5, max_retries=3,
                                      snapshot_every=100)
    model.fit(x, y, epochs=50, callbacks=[
        keras_ckpt.ModelCheckpoint("ckpt/{epoch}.keras", resume=True), guard])
    print(guard.events)
    ```
    """

    def __init__(
        self,
        raise_error: bool = False,
        *,
        action: str | None = None,
        check_weights: str | int | None = None,
        rollback_from: str = "memory",
        snapshot_every: int | None = None,
        lr_factor: float | None = None,
        max_retries: int = 3,
        verbose: int = 1,
    ) -> None:
        super().__init__()
        check_bool("raise_error", raise_error)
        if action is None:
            action = "raise" if raise_error else "stop"
        check_choice("action", action, ACTIONS)
        if raise_error and action != "raise":
            raise ValueError(f"`raise_error=True` contradicts action={action!r}; pass one.")
        if check_weights is not None and check_weights != "epoch":
            if isinstance(check_weights, str):
                raise ValueError(f"`check_weights` must be None, 'epoch' or a positive integer; "
                                 f"got {check_weights!r}.")
            check_number("check_weights", check_weights, minimum=1, integer=True)
        check_choice("rollback_from", rollback_from, ROLLBACK_SOURCES)
        check_number("snapshot_every", snapshot_every, allow_none=True, minimum=1, integer=True)
        check_number("lr_factor", lr_factor, allow_none=True, minimum=0, exclusive=True)
        if lr_factor is not None and lr_factor > 1:
            raise ValueError(f"`lr_factor` must be in (0, 1]; got {lr_factor!r}.")
        check_number("max_retries", max_retries, minimum=0, integer=True)
        check_number("verbose", verbose, minimum=0, integer=True)
        if action != "rollback" and (snapshot_every is not None or lr_factor is not None):
            raise ValueError("`snapshot_every` and `lr_factor` apply to action='rollback'.")
        self.raise_error = action == "raise"
        self.action = action
        self.check_weights = check_weights
        self.rollback_from = rollback_from
        self.snapshot_every = snapshot_every
        self.lr_factor = lr_factor
        self.max_retries = int(max_retries)
        self.verbose = verbose
        # The check reads Python numbers and sets a flag: safe where Keras
        # dispatches batch hooks on a thread pool. A rollback writes
        # variables, so it runs synchronously.
        self.async_safe = action == "stop" and check_weights is None
        self.events: list[NaNEvent] = []
        self.retries = 0
        self._tainted: NaNEvent | None = None
        self._snapshot: state_lib.Snapshot | None = None
        self._snapshot_epoch = -1
        self._scale_since_snapshot = 1.0
        self._epoch = 0
        self._steps = 0
        self._settled_batch: tuple | None = None
        self._unannounced: str | None = None  # a stop not printed yet: its note

    # ------------------------------------------------------------ state
    def get_state(self) -> dict:
        """The events so far and the retries used."""
        return {"events": [{**dataclasses.asdict(e), "value": encode_float(e.value)}
                           for e in self.events],
                "retries": self.retries}

    def set_state(self, state: dict) -> None:
        """Restores `get_state()`'s output."""
        self.events = [NaNEvent(**{**e, "value": decode_float(e.get("value"))})
                       for e in state.get("events", [])]
        self.retries = int(state.get("retries", 0))

    def get_config(self) -> dict:
        """The constructor arguments."""
        return {"raise_error": self.raise_error, "action": self.action,
                "check_weights": self.check_weights, "rollback_from": self.rollback_from,
                "snapshot_every": self.snapshot_every, "lr_factor": self.lr_factor,
                "max_retries": self.max_retries, "verbose": self.verbose}

    def blocks_saving(self) -> str | None:
        """Vetoes checkpoints while the model's state is not finite."""
        if self._tainted is None:
            return None
        return f"the state is not finite since {self._tainted.describe()}"

    # ------------------------------------------------------------ hooks
    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        if not self.restored_this_fit():
            self.events, self.retries = [], 0
        self._tainted, self._unannounced = None, None
        if self.lr_factor is not None and not isinstance(
                keras_compat.learning_rate_variable(self.model.optimizer), keras.Variable):
            raise ValueError("TerminateOnNaN: `lr_factor` needs the optimizer's learning rate "
                             "to be a float (a variable), not a schedule.")
        self._snapshot = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch
        if self._snapshot is None and self.action == "rollback" and self.rollback_from == "memory":
            # The first snapshot of a fit, taken once every on_train_begin has
            # run: after a resume it holds the restored state, not a fresh one.
            self._take_snapshot()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        with self.hook_lock:  # Keras's callback pool may run two steps' hooks at once
            self.settle_batch_end(batch, logs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._announce()  # Keras has waited for every batch hook of the epoch
        super().on_epoch_end(epoch, logs)

    def on_train_end(self, logs: dict | None = None) -> None:
        self._announce()

    def settle_batch_end(self, batch: int, logs: dict | None) -> None:
        """Checks step `batch` once (ModelCheckpoint calls it before a batch save)."""
        # Steps trained, not Keras's index (a partial last execution reports
        # past the epoch's end): the same step whoever asks, the hook or a save.
        step = steps_done(self.params, batch)
        key = (self._epoch, step)
        if self._settled_batch == key:
            return
        self._settled_batch = key
        if self.replaying(batch):
            return  # a replay of a step trained before the resume
        event = _first_non_finite(logs, self._epoch, step)
        if event is None and isinstance(self.check_weights, int) and step % self.check_weights == 0:
            event = self._check_variables(step)
        if event is not None:
            self._handle(event)
        elif (self.snapshot_every and step % self.snapshot_every == 0
              and self.action == "rollback" and self.rollback_from == "memory"):
            self._take_snapshot()

    def epoch_end(self, epoch: int, logs: dict) -> None:
        event = _first_non_finite(logs, epoch, None)
        if event is None and self.check_weights is not None:
            event = self._check_variables(None)
        if event is not None:
            self._handle(event)
        elif self.action == "rollback" and self.rollback_from == "memory":
            self._take_snapshot()

    def non_finite_state(self, variable: str, epoch: int, step: int | None) -> None:
        """A checkpoint was refused: `variable` is not finite (checked at every save)."""
        self._handle(NaNEvent(epoch, step, variable, None, ""))

    # ------------------------------------------------------------ actions
    def _check_variables(self, step: int | None) -> NaNEvent | None:
        for v in self.model.variables:
            if not keras.ops.convert_to_numpy(keras.ops.all(keras.ops.isfinite(v))):
                return NaNEvent(self._epoch, step, v.path, None, "")
        return None

    def _handle(self, event: NaNEvent) -> None:
        if self._tainted is not None:
            # Already stopping. On Keras's callback pool a later step's hook
            # can come first: the earliest non-finite step is the one kept.
            if self._unannounced is not None and _earlier(event, self._tainted):
                event.action = self._tainted.action
                self.events[self.events.index(self._tainted)] = event
                self._tainted = event
            return
        event.action, note = self.action, ""
        if self.action == "rollback" and self.retries >= self.max_retries:
            event.action = "stop"
            note = f" (after {self.retries} rollbacks)"
        self.events.append(event)
        self._tainted = event
        if event.action == "raise":
            message = (f"{_keras_words(event, raising=True)}TerminateOnNaN: non-finite value "
                       f"at {event.describe()}. Training stopped; the checkpoints keep the "
                       "last finite state.")
            # The fit's session closes on it: siblings restore (EarlyStopping), the
            # lock and signal handlers are released.
            raise RuntimeError(message)
        if event.action == "rollback":
            self._rollback(event)
            return
        keras_compat.callback_model(self).stop_training = True
        self._unannounced = note
        if self.on_training_thread():
            self._announce()

    def _announce(self) -> None:
        """Prints the stop once the event is final (after every pending hook ran)."""
        if self._unannounced is not None and self._tainted is not None and self.verbose > 0:
            event = self._tainted
            print_msg(f"\n{_keras_words(event, raising=False)}TerminateOnNaN: non-finite "
                      f"value at {event.describe()}; stopping training{self._unannounced}.")
        self._unannounced = None

    def _take_snapshot(self) -> None:
        optimizer = self.model.optimizer
        if not optimizer.built:  # as its first step would; so the snapshot has its slots
            optimizer.build(self.model.trainable_variables)
        self._snapshot = state_lib.capture(self.model)
        self._snapshot_epoch = self._epoch
        self._scale_since_snapshot = 1.0

    def _rollback(self, event: NaNEvent) -> None:
        self.retries += 1
        source = self._restore_finite_state()
        if source is None:
            event.action = "stop"
            print_msg(f"\n{_keras_words(event, raising=False)}TerminateOnNaN: non-finite value "
                      f"at {event.describe()} and no finite state to roll back to; stopping "
                      "training.")
            self.model.stop_training = True
            return
        if self.lr_factor is not None:
            self._scale_since_snapshot *= self.lr_factor
            lr = keras_compat.learning_rate_variable(self.model.optimizer)
            lr.assign(lr.numpy() * self._scale_since_snapshot)
        self._tainted = None
        if self.verbose > 0:
            lr_note = (f", learning rate now {float(self.model.optimizer.learning_rate):.3g}"
                       if self.lr_factor is not None else "")
            print_msg(f"\nTerminateOnNaN: non-finite value at {event.describe()}; rolled back "
                      f"to {source}{lr_note} (retry {self.retries} of {self.max_retries}).")

    def _restore_finite_state(self) -> str | None:
        model = self.model
        if self.rollback_from == "memory":
            if self._snapshot is None:
                return None
            state_lib.apply(self._snapshot, model, metrics=False, rng=False)
            if not (self._snapshot_epoch == self._epoch
                    and state_lib.apply_metrics(self._snapshot, model)):
                model.reset_metrics()
            return f"the snapshot of epoch {self._snapshot_epoch + 1}"
        for obj in registry.objects_for(model).values():
            if not isinstance(obj, ModelCheckpoint):
                continue
            found = manager.latest_checkpoint(obj.directory)
            if found is not None:
                info, snapshot = found
                state_lib.apply(snapshot, model, metrics=False, rng=False)
                model.reset_metrics()
                self._scale_since_snapshot = 1.0
                return info.path
        return None


def _keras_words(event: NaNEvent, raising: bool) -> str:
    """What Keras's TerminateOnNaN says of a non-finite log value, for code that matches on it.

    Keras raises `"NaN or Inf loss encountered at batch B."` and prints
    `"Batch B: Invalid loss, terminating training"`, B the 0-based batch
    index within the epoch. A value at epoch end (validation) is said to be at
    the end of the epoch; a non-finite variable (`check_weights`) is not a
    loss, and gets keras-ckpt's words only.
    """
    if event.value is None:
        return ""
    if event.step is None:
        where = f"the end of epoch {event.epoch + 1}"
        return (f"NaN or Inf loss encountered at {where}. " if raising
                else f"End of epoch {event.epoch + 1}: Invalid loss, terminating training. ")
    batch = event.step - 1
    return (f"NaN or Inf loss encountered at batch {batch}. " if raising
            else f"Batch {batch}: Invalid loss, terminating training. ")


def _earlier(event: NaNEvent, than: NaNEvent) -> bool:
    """Whether `event` is at an earlier step of the same epoch than `than`."""
    return (event.epoch == than.epoch and event.step is not None
            and (than.step is None or event.step < than.step))


def _first_non_finite(logs: dict | None, epoch: int, step: int | None) -> NaNEvent | None:
    for key, value in non_finite_logs(logs).items():
        return NaNEvent(epoch, step, key, value, "")
    return None

