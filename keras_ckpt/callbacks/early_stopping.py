"""`EarlyStopping`: Keras's early stopping, whose patience and best weights survive a resume."""

from __future__ import annotations

import collections.abc
import contextlib
import math
import os
from typing import Any

import numpy as np

from keras_ckpt import multi_worker, storage
from keras_ckpt.callbacks.base import MonitorAttributes, StatefulCallback, print_msg
from keras_ckpt.monitor import Monitor, keras_mode
from keras_ckpt.state import Snapshot
from keras_ckpt.validation import check_bool, check_number
from keras_ckpt.warn import warn

__all__ = ["EarlyStopping"]


class EarlyStopping(MonitorAttributes, StatefulCallback):
    """Stops training when a monitored quantity stops improving; restores the best weights.

    A drop-in for `keras.callbacks.EarlyStopping`: the same arguments,
    defaults and decisions, on keras-ckpt's shared comparator (`Monitor`), so
    a NaN value never becomes `best`. What Keras does not do:

    - its state (wait, best, best epoch, whether it already stopped, and the
      best weights) rides in every keras-ckpt `ModelCheckpoint` of the same
      fit and is restored on resume: patience does not start over, and
      restore-best gives the best epoch of the whole run, not of the last
      session. A resumed run that had already stopped trains no further.
    - restore-best runs at the end of training whatever ended it (patience,
      another callback's stop, the last epoch) and, with
      `restore_on_interrupt=True`, also when Ctrl-C or an error in the
      training or validation step ends `fit` with an exception.
    - opt-in stops: `check_finite`, `stopping_threshold`,
      `divergence_threshold`; and a relative `min_delta`.

    It has no batch-level hooks, so Keras's asynchronous batch dispatch
    stays on.

    Args:
        monitor: quantity to watch, e.g. `"val_loss"`.
        min_delta: smallest change that counts as an improvement (>= 0).
        patience: epochs without improvement after which training stops.
        verbose: 0 (silent) or 1 (say why training stopped, which epoch was
            best, and where restored weights came from).
        mode: `"auto"`, `"min"` or `"max"`. Another value warns and falls
            back to `"auto"`, as in Keras.
        baseline: patience restarts only when the value beats both the best
            so far and this baseline; so training stops after `patience`
            epochs unless the quantity beats the baseline.
        restore_best_weights: at the end of training, set the model's weights
            to those of the best epoch.
        start_from_epoch: epochs to wait before watching the quantity.
        min_delta_mode: `"absolute"` (Keras) or `"relative"` (a fraction of
            the best value).
        check_finite: stop at once when the value is NaN or infinite.
        stopping_threshold: stop as soon as the value reaches this target.
        divergence_threshold: stop as soon as the value is worse than this.
        restore_on_interrupt: also restore the best weights when `fit` ends
            with KeyboardInterrupt (Ctrl-C in the main thread) or an exception
            in the training or validation step.
        best_weights_path: keep the best weights in this file (written
            crash-safely, one variable at a time) instead of host memory, for
            models too big to copy. The previous best stays beside it, as
            `.NAME.previous`, so that a crash between a new best and the next
            checkpoint does not lose the best the checkpoint knows. By default
            they are kept in host memory and saved inside each checkpoint.

    Attributes:
        stop_reason: None, or `"patience"`, `"non-finite"`, `"threshold"` or
            `"divergence"`; `stopped_epoch` and `stop_message` say when and why.
        best, best_epoch, wait: the comparator's view (Keras's names; `best`
            and `wait` may be set, as on Keras's callback).
        monitor_op: Keras's comparison, `keras.ops.less` or
            `keras.ops.greater` (None until the direction is known).
        best_weights: the best epoch's weights, as `model.get_weights()`
            returned them (None when kept in `best_weights_path`).

    Example:
    ```python
    stop = keras_ckpt.EarlyStopping(monitor="val_loss", patience=5,
                                    restore_best_weights=True)
    model.fit(x, y, validation_split=0.1, epochs=200, callbacks=[
        keras_ckpt.ModelCheckpoint("ckpt/{epoch:03d}.keras", resume=True), stop])
    ```
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0,
        patience: int = 0,
        verbose: int = 0,
        mode: str = "auto",
        baseline: float | None = None,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
        *,
        min_delta_mode: str = "absolute",
        check_finite: bool = False,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        restore_on_interrupt: bool = False,
        best_weights_path: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        mode = keras_mode(mode, type(self).__name__)
        self._monitor = Monitor(monitor, mode=mode, min_delta=min_delta, patience=patience,
                                baseline=baseline, start_from_epoch=start_from_epoch,
                                min_delta_mode=min_delta_mode, owner="EarlyStopping")
        for name, value in (("restore_best_weights", restore_best_weights),
                            ("check_finite", check_finite),
                            ("restore_on_interrupt", restore_on_interrupt)):
            check_bool(name, value)
        check_number("verbose", verbose, minimum=0, integer=True)
        check_number("stopping_threshold", stopping_threshold, allow_none=True)
        check_number("divergence_threshold", divergence_threshold, allow_none=True)
        if best_weights_path is not None:
            if not isinstance(best_weights_path, (str, os.PathLike)):
                raise TypeError("`best_weights_path` must be a file path or None; got "
                                f"{best_weights_path!r}.")
            best_weights_path = os.fspath(best_weights_path)
            if not best_weights_path.endswith(".weights.h5"):
                raise ValueError("`best_weights_path` must end in `.weights.h5`; got "
                                 f"{best_weights_path!r}.")
            if not restore_best_weights:
                raise ValueError("`best_weights_path` keeps the best weights for "
                                 "restore_best_weights=True; pass that too.")
        self.monitor = monitor
        self.min_delta = min_delta
        self.patience = patience
        self.verbose = verbose
        self.mode = mode
        self.baseline = baseline
        self.restore_best_weights = restore_best_weights
        self.start_from_epoch = start_from_epoch
        self.min_delta_mode = min_delta_mode
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.restore_on_interrupt = restore_on_interrupt
        self.best_weights_path = best_weights_path
        self._workers: multi_worker.Workers | None = None
        self._reset()

    # ------------------------------------------------------------ state
    def _reset(self) -> None:
        self._monitor.reset()
        self.stopped_epoch = 0
        self.stop_reason: str | None = None
        self.stop_message = ""
        self.best_epoch = 0
        self.best_weights: list[np.ndarray] | None = None
        self._has_best = False  # best weights recorded (in memory or on disk)
        self._restored_from: str | None = None

    @property
    def wait(self) -> int:
        """Epochs since the last improvement (Keras's `wait`)."""
        return self._monitor.wait

    @wait.setter
    def wait(self, value: int) -> None:
        self._monitor.wait = int(value)

    def get_state(self) -> dict:
        """Wait, best, best epoch, stop, and the best weights (as arrays, or their file)."""
        state: dict[str, Any] = {
            "monitor": self._monitor.get_state(),
            "best_epoch": self.best_epoch,
            "stopped_epoch": self.stopped_epoch,
            "stop_reason": self.stop_reason,
            "stop_message": self.stop_message,
            "has_best": self._has_best,
            "best_weights_path": self.best_weights_path,
            "n_best": 0,
        }
        if self.best_weights is not None:
            state["n_best"] = len(self.best_weights)
            for i, array in enumerate(self.best_weights):
                state[f"best_{i:05d}"] = array
        return state

    def set_state(self, state: dict) -> None:
        """Restores `get_state()`'s output."""
        self._monitor.set_state(state["monitor"])
        self.best_epoch = int(state["best_epoch"])
        self.stopped_epoch = int(state["stopped_epoch"])
        self.stop_reason = state.get("stop_reason")
        self.stop_message = state.get("stop_message", "")
        self._has_best = bool(state.get("has_best"))
        n = int(state.get("n_best", 0))
        self.best_weights = [state[f"best_{i:05d}"] for i in range(n)] if n else None
        self._restored_from = "checkpoint"

    def finished(self) -> str | None:
        """Why training must not continue after a resume, or None."""
        if self.stop_reason is None:
            return None
        return (f"EarlyStopping already stopped training after epoch {self.stopped_epoch + 1} "
                f"({self.stop_reason}); resuming trains no further.")

    def get_config(self) -> dict:
        """The constructor arguments."""
        return {
            "monitor": self.monitor, "min_delta": self.min_delta, "patience": self.patience,
            "verbose": self.verbose, "mode": self.mode, "baseline": self.baseline,
            "restore_best_weights": self.restore_best_weights,
            "start_from_epoch": self.start_from_epoch, "min_delta_mode": self.min_delta_mode,
            "check_finite": self.check_finite, "stopping_threshold": self.stopping_threshold,
            "divergence_threshold": self.divergence_threshold,
            "restore_on_interrupt": self.restore_on_interrupt,
            "best_weights_path": self.best_weights_path,
        }

    # ------------------------------------------------------------ hooks
    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        if not self.restored_this_fit():
            self._reset()
        self._monitor.resolve(self.model)
        # Several workers: the chief writes `best_weights_path`, all read it.
        self._workers = multi_worker.workers_of(self.model)
        if self._workers is not None and self.restore_best_weights:
            self._workers.check_model(self.model, "EarlyStopping(restore_best_weights=True)",
                                      refuse="it keeps whole arrays")
        if self.restore_on_interrupt:
            self._install_interrupt_guards()

    def epoch_end(self, epoch: int, logs: dict) -> None:
        current = self._monitor.get_value(logs)
        if current is not None and not math.isfinite(current) and self.check_finite:
            self._stop(epoch, "non-finite", f"{self.monitor} is {current}")
            return
        if current is None or epoch < self.start_from_epoch:
            return
        decision = self._monitor.update(current, epoch)
        if decision.improved:
            self.best_epoch = epoch
            if self.restore_best_weights:
                self._record_best(epoch)
        direction = self._monitor.direction
        if self.stopping_threshold is not None and math.isfinite(current) and (
                current <= self.stopping_threshold if direction == "min"
                else current >= self.stopping_threshold):
            self._stop(epoch, "threshold",
                       f"{self.monitor} = {current:.5g} reached {self.stopping_threshold}")
        elif self.divergence_threshold is not None and math.isfinite(current) and (
                current > self.divergence_threshold if direction == "min"
                else current < self.divergence_threshold):
            self._stop(epoch, "divergence",
                       f"{self.monitor} = {current:.5g} is past {self.divergence_threshold}")
        elif not decision.improved and decision.patience_exhausted and epoch > 0:
            self._stop(epoch, "patience",
                       f"no improvement in {self.monitor} for {self.wait} epochs")

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.stop_reason is not None and self.verbose > 0:
            print_msg(f"Epoch {self.stopped_epoch + 1}: early stopping ({self.stop_message})")
        self._restore_best(in_step=True)

    # ------------------------------------------------------------ best weights
    def _stop(self, epoch: int, reason: str, why: str) -> None:
        self.stopped_epoch = epoch
        self.stop_reason = reason
        self.stop_message = why
        self.model.stop_training = True

    def _previous_best_path(self) -> str:
        head, tail = os.path.split(self.best_weights_path)
        return os.path.join(head, f".{tail}.previous")

    def _record_best(self, epoch: int) -> None:
        if self.best_weights_path is not None:
            if self._workers is not None and not self._workers.is_chief:
                self._has_best = True
                return
            # The file the newest checkpoint knows may be this one: keep it
            # as the previous best (a rename, no copy) until the next one.
            # A crash between a new best and the checkpoint that records it
            # then still finds the checkpoint's best epoch.
            if os.path.exists(self.best_weights_path):
                os.replace(self.best_weights_path, self._previous_best_path())
            # The variables themselves, written one at a time: no host copy
            # of the whole model.
            snapshot = Snapshot(arrays={f"weights/{i:05d}": v
                                        for i, v in enumerate(self.model.weights)},
                                meta={"kind": "best_weights", "epoch": epoch})
            storage.write(self.best_weights_path, snapshot)
        else:
            self.best_weights = None  # drop the old copy first: one copy at most
            # The public API, as Keras's EarlyStopping: fresh host arrays.
            self.best_weights = self.model.get_weights()
        self._has_best = True

    def _read_best_file(self, stack: contextlib.ExitStack) -> tuple[Any, str] | None:
        """The best weights of `best_epoch` from the file or its previous slot.

        Verified whole, then read one array at a time (`storage.read_lazily`),
        the file open until `stack` closes.
        """
        found = []
        for path in (self.best_weights_path, self._previous_best_path()):
            own = contextlib.ExitStack()
            try:
                snapshot = own.enter_context(storage.read_lazily(path))
            except (OSError, storage.CorruptCheckpointError) as e:
                found.append(f"{path}: {e}")
                continue
            if snapshot.meta.get("epoch") == self.best_epoch:
                stack.enter_context(own.pop_all())
                return snapshot, path
            own.close()
            found.append(f"{path} holds the weights of epoch {snapshot.meta.get('epoch', -1) + 1}")
        # Both written after the checkpoint this run resumed from, by a run
        # that then crashed: not the best epoch of this run's history.
        warn(
            f"EarlyStopping: cannot restore the best weights of epoch {self.best_epoch + 1} "
            f"({'; '.join(found)}); the model keeps its current weights.")
        return None

    def _restore_best(self, in_step: bool = False) -> None:
        """`in_step`: every worker is here at once (not an error on one of them)."""
        if not self.restore_best_weights or not self._has_best:
            return
        where = "host memory"
        with contextlib.ExitStack() as stack:
            if self.best_weights_path is not None:
                if self._workers is not None and in_step:
                    self._workers.barrier()  # until the chief has written the file
                read = self._read_best_file(stack)
                if read is None:
                    return
                snapshot, where = read
                values: Any = _InOrder(snapshot.arrays)  # each read as it is assigned
            else:
                values = self.best_weights
                if self._restored_from == "checkpoint":
                    where = "the checkpoint resumed from"
            self.model.set_weights(values)
        if self.verbose > 0:
            print_msg(f"Restoring model weights from the end of the best epoch: "
                      f"{self.best_epoch + 1} ({self.monitor} = {self.best}), kept in {where}.")

    # ------------------------------------------------------------ interrupts
    def _install_interrupt_guards(self) -> None:
        # Whatever ends the fit with an exception (a step's error, Ctrl-C, a
        # sibling's raise) closes the fit's session, which calls this first.
        # Nothing runs in a signal handler.
        self.fit_session.on_error(self._restore_on_error)

    def _restore_on_error(self, error: BaseException | None = None) -> None:
        if self.verbose > 0:
            print_msg("EarlyStopping: training was interrupted; restoring the best weights.")
        self._restore_best()


class _InOrder(collections.abc.Sequence):
    """A best-weights file's arrays in `model.weights` order, each read when `set_weights`
    takes it (one array in memory at a time)."""

    def __init__(self, arrays: Any) -> None:
        self._arrays = arrays

    def __len__(self) -> int:
        return len(self._arrays)

    def __getitem__(self, i: Any) -> Any:
        if not isinstance(i, int) or not 0 <= i < len(self):
            raise IndexError(i)
        return self._arrays[f"weights/{i:05d}"]
