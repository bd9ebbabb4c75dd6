"""`ModelCheckpoint`: Keras's checkpoint callback, saving the whole training state."""

from __future__ import annotations

import datetime
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import keras

from keras_ckpt import manager, registry, storage
from keras_ckpt import state as state_lib
from keras_ckpt.callbacks.base import StatefulCallback, non_finite_logs, print_msg
from keras_ckpt.jsonsafe import decode_float, encode_float
from keras_ckpt.monitor import Monitor
from keras_ckpt.validation import check_number

__all__ = ["ModelCheckpoint"]

def _history_of(model: Any) -> Any:
    history = getattr(model, "history", None)
    return history if isinstance(history, keras.callbacks.History) else None


class ModelCheckpoint(StatefulCallback):
    """Saves the whole training state, crash-safely, and resumes from it.

    A drop-in for `keras.callbacks.ModelCheckpoint`: the same arguments and
    defaults, the same file names, saved at the same moments, and files that
    `keras.saving.load_model` (`.keras`) or `model.load_weights`
    (`.weights.h5`) read as before. Each file also carries the full training
    state: every model variable (Dropout seed-generator and BatchNorm state
    included), every optimizer variable, the compiled metrics' running state,
    the epoch and step, the history, the global Python/NumPy RNG states and
    the state of the other keras-ckpt callbacks in the same `fit`.

    Every write goes to a hidden temporary file that is fsynced, checksummed
    and renamed into place: a checkpoint is either complete or invisible, and
    a crash mid-write leaves the previous one intact. A state whose loss or
    monitored value is not finite is never written.

    Args:
        filepath: path template, formatted with `epoch` (1-based), `batch`
            (with an integer `save_freq`) and the log keys, e.g.
            `"ckpt/{epoch:02d}-{val_loss:.2f}.keras"`. Must end in `.keras`
            (or legacy `.h5`), or in `.weights.h5` with `save_weights_only`.
        monitor: quantity compared by `save_best_only`.
        verbose: 0 (silent) or 1 (a message for each action).
        save_best_only: save only when `monitor` improves on the best so far.
        save_weights_only: write a `.weights.h5` file Keras's `load_weights`
            reads (the training state rides in the same file).
        mode: `"auto"`, `"min"` or `"max"`, for `monitor`.
        save_freq: `"epoch"`, or an integer: save every that many training
            steps (counted in steps, also with `steps_per_execution`).
        initial_value_threshold: a value the monitor must beat before the
            first `save_best_only` save.
        resume: False (Keras's behaviour); True: at train begin, restore the
            newest valid checkpoint in `filepath`'s directory and continue
            from its epoch and step; or the path of one checkpoint to continue
            from (the directory it is in is only read).
        retention: retention policies (`KeepLast`, `KeepBest`, `KeepEvery`);
            a checkpoint this callback wrote is deleted once no policy keeps
            it. The newest is always kept. None keeps everything.
        save_interval: also save when this many seconds (or a `timedelta`)
            have passed since the last save, checked after each step.
        save_last: also keep `last.keras` / `last.weights.h5` beside the
            others, always the newest state (a hard link where possible).
        clock: a zero-argument function returning seconds, for
            `save_interval` (default `time.monotonic`).
        fsync: make each write durable before renaming it into place.

    Example:
    ```python
    checkpoint = keras_ckpt.ModelCheckpoint(
        "ckpt/epoch-{epoch:03d}.keras", resume=True,
        retention=[keras_ckpt.KeepLast(3)])
    model.fit(x, y, epochs=100, callbacks=[checkpoint])
    # Kill the process at any moment and run the same script again: it
    # continues from the newest checkpoint.
    ```
    """

    def __init__(
        self,
        filepath: str | os.PathLike,
        monitor: str = "val_loss",
        verbose: int = 0,
        save_best_only: bool = False,
        save_weights_only: bool = False,
        mode: str = "auto",
        save_freq: str | int = "epoch",
        initial_value_threshold: float | None = None,
        *,
        resume: bool | str | os.PathLike = False,
        retention: Sequence[Any] | None = None,
        save_interval: float | datetime.timedelta | None = None,
        save_last: bool = False,
        clock: Callable[[], float] | None = None,
        fsync: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(filepath, (str, os.PathLike)):
            raise TypeError(f"`filepath` must be a string or path; got {filepath!r}.")
        self.filepath = os.fspath(filepath)
        self._fields = manager.template_fields(self.filepath)
        ext = storage.extension(self.filepath)
        if save_weights_only and ext != ".weights.h5":
            raise ValueError(
                "With `save_weights_only=True`, `filepath` must end in `.weights.h5` (the "
                f"Keras weights format); got filepath={self.filepath!r}."
            )
        if not save_weights_only and ext not in (".keras", ".h5"):
            raise ValueError(
                "`filepath` must end in `.keras` (the Keras model format), or in "
                f"`.weights.h5` with save_weights_only=True; got filepath={self.filepath!r}."
            )
        if save_freq != "epoch":
            if isinstance(save_freq, str):
                raise ValueError(f"`save_freq` must be 'epoch' or a positive integer; "
                                 f"got {save_freq!r}.")
            check_number("save_freq", save_freq, minimum=1, integer=True)
        if isinstance(save_interval, datetime.timedelta):
            save_interval = save_interval.total_seconds()
        check_number("save_interval", save_interval, allow_none=True, minimum=0, exclusive=True)
        if not isinstance(resume, (bool, str, os.PathLike)):
            raise TypeError(f"`resume` must be True, False or a checkpoint path; got {resume!r}.")
        if not isinstance(resume, bool):
            resume = os.fspath(resume)
            if not os.path.isfile(resume):
                raise FileNotFoundError(f"`resume` names {resume!r}, which is not a file.")
        for policy in retention or []:
            if not callable(getattr(policy, "keep", None)):
                raise TypeError(
                    "`retention` must be a list of policies such as KeepLast(3), KeepBest(2) "
                    f"or KeepEvery(epochs=10); got {policy!r}."
                )
        if clock is not None and not callable(clock):
            raise TypeError(f"`clock` must be a function returning seconds; got {clock!r}.")
        self.monitor = monitor
        self.verbose = verbose
        self.save_best_only = bool(save_best_only)
        self.save_weights_only = bool(save_weights_only)
        self.mode = mode
        self.save_freq = save_freq
        self.initial_value_threshold = initial_value_threshold
        self.resume = resume
        self.retention = list(retention or [])
        self.save_interval = save_interval
        self.save_last = bool(save_last)
        self.fsync = bool(fsync)
        self._clock = clock or time.monotonic
        self._monitor = Monitor(monitor, mode=mode, initial_value_threshold=initial_value_threshold,
                                owner="ModelCheckpoint")
        self.directory = os.path.dirname(os.path.abspath(self.filepath))
        self._name_pattern = manager.template_regex(self.filepath)
        self.best_path: str | None = None
        self.last_save_seconds: float | None = None
        self.last_saved_path: str | None = None
        self.resumed_from: manager.CheckpointInfo | None = None
        # Batch-level work only when asked for, so that Keras keeps its
        # asynchronous batch dispatch on the backends that have it.
        self._batch_level = save_freq != "epoch" or save_interval is not None
        self._metric_fields = [f for f in self._fields if f not in ("epoch", "batch")]
        if self._batch_level or self._metric_fields:
            self.on_train_batch_end = self._on_train_batch_end
        self._reset_progress()

    # ------------------------------------------------------------ state
    @property
    def best(self) -> float | None:
        """The best monitored value so far (`save_best_only`)."""
        return self._monitor.best

    def get_state(self) -> dict:
        """The callback's own state: its comparator and last save step."""
        return {"monitor": self._monitor.get_state(),
                "last_save_step": self._last_save_step}

    def set_state(self, state: dict) -> None:
        """Restores `get_state()`'s output."""
        self._monitor.set_state(state["monitor"])
        self._last_save_step = int(state.get("last_save_step", 0))

    def get_config(self) -> dict:
        """The constructor arguments (as Keras callbacks report them)."""
        return {
            "filepath": self.filepath, "monitor": self.monitor, "verbose": self.verbose,
            "save_best_only": self.save_best_only, "save_weights_only": self.save_weights_only,
            "mode": self.mode, "save_freq": self.save_freq,
            "initial_value_threshold": self.initial_value_threshold,
            "resume": self.resume, "save_interval": self.save_interval,
            "save_last": self.save_last, "fsync": self.fsync,
        }

    def _reset_progress(self) -> None:
        self._epoch = 0
        self._epoch_start_step = 0
        self._last_save_step = 0
        self._last_save_time = 0.0
        self._fields_unchecked = bool(self._metric_fields)
        self._resume_step = 0  # steps already trained in the epoch being resumed
        self._pending_epochs: list[int] | None = None
        self._epoch_rng = None
        self._epoch_data_states: dict = {}
        self._skipper: tuple | None = None

    # ------------------------------------------------------------ hooks
    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        model = self.model
        self._reset_progress()
        if self.save_best_only or any(
                getattr(p, "monitor", "") is None for p in self.retention):
            self._monitor.resolve(model)
        for policy in self.retention:
            if hasattr(policy, "monitor") and policy.monitor is None:
                policy.monitor = self.monitor
                if policy.mode is None:
                    policy.mode = self._monitor.direction
        self._check_filepath()
        self._clean_temporaries()
        if self.resume:
            self._resume()
        self._last_save_time = self._clock()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch
        self._epoch_start_step = self._global_step() - self._resume_step
        self._resume_step = 0
        # A save inside this epoch (periodic, or a sibling's stop) must let a
        # resume replay the epoch's data order: keep the RNG and data-helper
        # states of its start.
        self._epoch_rng = state_lib.capture_rng()
        self._epoch_data_states = state_lib.object_states(
            {k: o for k, o in registry.objects_for(self.model).items() if k.startswith("data:")})
        history = _history_of(self.model)
        if self._pending_epochs is not None and history is not None:
            history.epoch[:0] = self._pending_epochs
            self._pending_epochs = None

    def _on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._fields_unchecked:
            self._check_fields(logs or {})
        if not self._batch_level or batch < registry.replay_until(self.model):
            return
        if self.save_freq != "epoch":
            # Count steps, not hook calls: with steps_per_execution=N, Keras
            # calls this hook every N steps with the last step's index.
            step = self._epoch_start_step + batch + 1
            if step - self._last_save_step >= self.save_freq:
                self._save(logs or {}, steps_in_epoch=batch + 1)
                return
        if (self.save_interval is not None
                and self._clock() - self._last_save_time >= self.save_interval):
            self._save(logs or {}, steps_in_epoch=batch + 1)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        registry.set_replay(self.model, -1)
        if registry.cut_short(self.model) == epoch:
            return  # a stop cut the epoch short: its mid-epoch checkpoint is the newest
        if self.save_freq == "epoch":
            self._settle_siblings(epoch, logs)
            self._save(logs or {}, steps_in_epoch=None)

    def save_now(self, logs: dict | None, steps_in_epoch: int) -> str | None:
        """Writes a checkpoint at this step (a sibling is stopping training here).

        Args:
            logs: the step's logs.
            steps_in_epoch: steps done in the current epoch.

        Returns:
            The path written, or None if nothing could be saved (non-finite).
        """
        return self._save(logs or {}, steps_in_epoch=steps_in_epoch, force=True)

    def _settle_siblings(self, epoch: int, logs: dict | None) -> None:
        # The other keras-ckpt callbacks in this fit finish the epoch first,
        # so the checkpoint holds their state after it, whatever the order.
        for obj in registry.objects_for(self.model).values():
            if isinstance(obj, StatefulCallback) and not isinstance(obj, ModelCheckpoint):
                obj.settle_epoch_end(epoch, logs)

    def on_train_end(self, logs: dict | None = None) -> None:
        model = self.model
        if self._skipper is not None:
            skip, original = self._skipper
            if model.train_function is skip:  # not wrapped further by someone else
                model.train_function = original
            self._skipper = None
        registry.forget_start_epoch(model)

    # ------------------------------------------------------------ saving
    def _global_step(self) -> int:
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None or not getattr(optimizer, "built", False):
            return 0
        return int(keras.ops.convert_to_numpy(optimizer.iterations))

    def _file_path(self, logs: dict, steps_in_epoch: int | None) -> str:
        values = {k: v for k, v in logs.items()}
        values["epoch"] = self._epoch + 1
        if steps_in_epoch is not None and "batch" not in values:
            values["batch"] = steps_in_epoch
        try:
            return self.filepath.format(**values)
        except KeyError as e:
            raise KeyError(
                f"ModelCheckpoint cannot fill the placeholder {e} of filepath="
                f"{self.filepath!r}; available: {', '.join(sorted(values))}."
            ) from None

    def _save(self, logs: dict, steps_in_epoch: int | None, force: bool = False) -> str | None:
        """Saves if the rules say so; returns the path written (regular or `last`), or None.

        `force` (a sibling's stop): save regardless of `save_best_only`, into
        the `last` file when the regular one is reserved for the best.
        """
        epoch = self._epoch
        loss = logs.get("loss")
        loss = None if loss is None else float(loss)
        value = logs.get(self.monitor)
        value = None if value is None else float(value)
        where = f"Epoch {epoch + 1}" + (f", step {steps_in_epoch}" if steps_in_epoch else "")
        self._last_save_time = self._clock()
        if steps_in_epoch is not None:
            # Siblings with batch-level work (TerminateOnNaN) check this step first.
            for obj in registry.objects_for(self.model).values():
                settle = getattr(obj, "settle_batch_end", None)
                if settle is not None:
                    settle(steps_in_epoch - 1, logs)
        bad = non_finite_logs(logs)
        if bad:
            shown = ", ".join(f"{k}={v}" for k, v in bad.items())
            warnings.warn(
                f"ModelCheckpoint: not saving at {where}: the state is not finite ({shown}). "
                "The previous checkpoints stay as they are.", stacklevel=2)
            return None
        for obj in registry.objects_for(self.model).values():
            reason = obj.blocks_saving() if isinstance(obj, StatefulCallback) else None
            if reason:
                if self.verbose > 0:
                    print_msg(f"\n{where}: not saving: {reason}")
                return None
        global_step = self._global_step()
        self._last_save_step = global_step
        filepath = self._file_path(logs, steps_in_epoch)
        save_regular = not (force and self.save_best_only)
        write_last = self.save_last or not save_regular
        if self.save_best_only and not force:
            current = self._monitor.get_value(logs)
            if current is not None:
                previous = self._monitor.best
                if self._monitor.update(current, epoch, steps_in_epoch).improved:
                    if self.verbose > 0:
                        before = "None" if previous is None else f"{previous:.5f}"
                        print_msg(f"\n{where}: {self.monitor} improved from {before} to "
                                  f"{current:.5f}, saving model to {filepath}")
                else:
                    save_regular = False
                    if self.verbose > 0:
                        print_msg(f"\n{where}: {self.monitor} did not improve from "
                                  f"{self._monitor.best:.5f}")
        elif self.verbose > 0:
            print_msg(f"\n{where}: saving model to {filepath}")
        if not save_regular and not write_last:
            return None
        progress = {
            "epoch": epoch,
            "step": steps_in_epoch if steps_in_epoch is not None else (
                global_step - self._epoch_start_step),
            "epoch_complete": steps_in_epoch is None,
            "global_step": global_step,
            "steps_per_execution": int(getattr(self.model, "steps_per_execution", 1) or 1),
            "history": self._history_for(epoch, logs, steps_in_epoch is None),
        }
        states = state_lib.object_states(registry.objects_for(self.model))
        rng = None
        if steps_in_epoch is not None:
            rng = self._epoch_rng
            states.update(self._epoch_data_states)
        snapshot = state_lib.capture(self.model, states, progress, rng)
        meta = {
            "monitor": self.monitor, "monitor_value": encode_float(value),
            "loss": encode_float(loss), "written_at": time.time(),
            "keras_version": keras.__version__, "backend": keras.backend.backend(),
        }
        os.makedirs(os.path.dirname(os.path.abspath(filepath)), exist_ok=True)
        written = None
        started = time.monotonic()
        if save_regular:
            self._write(filepath, snapshot, {**meta, "kind": "regular"})
            written = self.last_saved_path = filepath
            if self.save_best_only:
                self.best_path = filepath
            if self.verbose > 0:
                print_msg(f"\n{where}: finished saving model to {filepath}")
        if write_last:
            last = self._write_last(filepath if save_regular else None, snapshot, meta)
            written = written or last
        self.last_save_seconds = time.monotonic() - started
        if self.retention:
            self._apply_retention()
        return written

    def _keras_writer(self) -> Callable[[str], None]:
        if self.save_weights_only:
            return lambda path: self.model.save_weights(path, overwrite=True)
        return lambda path: self.model.save(path, overwrite=True)

    def _write(self, filepath: str, snapshot: state_lib.Snapshot, meta: dict) -> None:
        if os.path.isdir(filepath):
            raise IsADirectoryError(
                f"ModelCheckpoint: filepath {filepath!r} is a directory; give a file name.")
        storage.write(filepath, snapshot, keras_writer=self._keras_writer(), meta=meta,
                      fsync=self.fsync)

    def _last_path(self) -> str:
        return os.path.join(self.directory, "last" + storage.extension(self.filepath))

    def _write_last(self, regular: str | None, snapshot: state_lib.Snapshot, meta: dict) -> str:
        last = self._last_path()
        if regular is not None:
            # The newest regular file is the same state: link it into place.
            tmp = os.path.join(self.directory, f".last.tmp-{os.getpid()}-link")
            try:
                if os.path.exists(tmp):
                    os.remove(tmp)
                os.link(regular, tmp)
                os.replace(tmp, last)
                return last
            except OSError:
                if os.path.exists(tmp):
                    os.remove(tmp)
        self._write(last, snapshot, {**meta, "kind": "last"})
        return last

    def _history_for(self, epoch: int, logs: dict, epoch_complete: bool) -> dict:
        history = _history_of(self.model)
        values = {k: list(v) for k, v in (history.history if history else {}).items()}
        epochs = list(history.epoch) if history else []
        if epoch_complete and epoch not in epochs:
            # Keras's History runs after us: add this epoch's logs ourselves.
            epochs.append(epoch)
            for k, v in logs.items():
                values.setdefault(k, []).append(v)
        return {"epoch": epochs,
                "values": {k: [encode_float(float(x)) for x in v] for k, v in values.items()}}

    # ------------------------------------------------------------ directory
    def _check_filepath(self) -> None:
        sample = {name: 0 for name in self._fields}
        sample["epoch"] = 1
        probe = self.filepath.format(**sample)
        if os.path.isdir(probe):
            raise IsADirectoryError(
                f"ModelCheckpoint: filepath {self.filepath!r} names a directory; give a "
                "file name such as 'ckpt/epoch-{epoch:02d}.keras'.")
        try:
            os.makedirs(self.directory, exist_ok=True)
            test = os.path.join(self.directory, f".write-test.tmp-{os.getpid()}")
            with open(test, "wb") as f:
                f.write(b"ok")
            os.remove(test)
        except OSError as e:
            raise PermissionError(
                f"ModelCheckpoint cannot write to {self.directory!r} ({e.strerror}); choose a "
                "writable directory in `filepath`.") from None

    def _check_fields(self, logs: dict) -> None:
        """After the first step: every placeholder must be a key the logs will have."""
        self._fields_unchecked = False
        known = set(logs) | {f"val_{k}" for k in logs}
        unknown = [f for f in self._metric_fields if f not in known]
        if unknown:
            available = ", ".join(["epoch", "batch"] + sorted(known))
            raise ValueError(
                f"ModelCheckpoint: filepath {self.filepath!r} has the placeholder "
                f"{{{unknown[0]}}}, which is not a key of the logs; available: {available}.")

    def _clean_temporaries(self) -> None:
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            if storage.is_temporary(name):
                pid = name.split(".tmp-")[-1].split("-")[0]
                if pid.isdigit() and _pid_alive(int(pid)) and int(pid) != os.getpid():
                    continue
                try:
                    os.remove(os.path.join(self.directory, name))
                    if self.verbose > 0:
                        print_msg(f"ModelCheckpoint: removed an unfinished write, {name}")
                except OSError:
                    pass

    def _own_checkpoints(self) -> list[manager.CheckpointInfo]:
        return [c for c in manager.list_checkpoints(self.directory)
                if c.kind == "regular" and self._name_pattern.match(os.path.basename(c.path))]

    def _apply_retention(self) -> None:
        protect = [p for p in (self.best_path, self.last_saved_path) if p]
        deleted = manager.apply_retention(self._own_checkpoints(), self.retention, protect)
        if deleted and self.verbose > 0:
            print_msg(f"ModelCheckpoint: retention removed {len(deleted)} checkpoint(s)")

    # ------------------------------------------------------------ resume
    def _resume(self) -> None:
        model = self.model
        if self.resume is True:
            found = manager.latest_checkpoint(self.directory)
            if found is None:
                if self.verbose > 0:
                    print_msg(f"ModelCheckpoint: no checkpoint in {self.directory}; "
                              "starting from scratch.")
                return
            info, snapshot = found
        else:
            snapshot = storage.read(self.resume)
            info = manager.info_from_meta(self.resume, snapshot.meta)
        state_lib.check_compatible(snapshot.meta, model)
        progress = snapshot.meta["progress"]
        epoch, step = info.resume_point
        spe = int(getattr(model, "steps_per_execution", 1) or 1)
        if step and step % spe:
            raise ValueError(
                f"The checkpoint {info.path} was written after step {step} of epoch "
                f"{epoch + 1}, which is not a multiple of this model's steps_per_execution="
                f"{spe}. Compile with the steps_per_execution the run used "
                f"({progress.get('steps_per_execution')}).")
        if step and keras.backend.backend() != "tensorflow":
            raise NotImplementedError(
                f"Resuming inside an epoch is supported on the TensorFlow backend; this is "
                f"{keras.backend.backend()}. Use save_freq='epoch' there.")
        objects = registry.objects_for(model)
        state_lib.apply(snapshot, model, objects, metrics=False)
        self.resumed_from = info
        finished = [obj.finished() for obj in objects.values()
                    if isinstance(obj, StatefulCallback) and obj.finished()]
        epochs = (self.params or {}).get("epochs")
        if finished and epochs is not None:
            print_msg(f"ModelCheckpoint: resumed from {info.path}. " + " ".join(finished))
            step = 0
            epoch = max(epoch, epochs)
        saved = progress.get("history", {})
        history = _history_of(model)
        if history is not None:
            history.history.clear()
            for k, v in saved.get("values", {}).items():
                history.history[k] = [decode_float(x) for x in v]
            self._pending_epochs = list(saved.get("epoch", []))
        if step:
            registry.set_replay(model, step)
            self._resume_step = step
            self._skipper = _skip_steps(model, step // spe, snapshot)
        registry.start_at_epoch(model, epoch)
        self._last_save_step = info.global_step
        if self.verbose > 0 and not finished:
            where = f"epoch {epoch + 1}" + (f", step {step + 1}" if step else "")
            print_msg(f"ModelCheckpoint: resumed from {info.path}; continuing at {where}.")
        if epochs is not None and epoch >= epochs and not finished:
            print_msg(f"ModelCheckpoint: the checkpoint already completed all {epochs} "
                      "epochs; nothing left to train.")


def _skip_steps(model: Any, calls: int, snapshot: state_lib.Snapshot) -> tuple:
    """Makes the next `calls` train-function calls consume their batches without training.

    The resumed epoch then sees exactly the batches the interrupted run had not
    trained on yet, in the same order. At the first call (after Keras has reset
    the metrics for the epoch) the compiled metrics are built from that batch
    if need be and get the interrupted epoch's running state back, so the
    epoch ends with the same logs. Afterwards it passes calls through (others
    may have wrapped it meanwhile). Returns `(wrapper, original)`.
    """
    original = model.train_function
    spe = int(getattr(model, "steps_per_execution", 1) or 1)
    remaining = [calls]

    def skip(iterator):
        if remaining[0] <= 0:
            return original(iterator)
        first = remaining[0] == calls
        remaining[0] -= 1
        for i in range(spe):
            batch = next(iterator)
            if first and i == 0:
                compiled = getattr(model, "_compile_metrics", None)
                if compiled is not None and not compiled.built:
                    model._symbolic_build(data_batch=batch)
                state_lib.apply_metrics(snapshot, model)
        return model.get_metrics_result()

    model.train_function = skip
    return skip, original


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
