"""ModelCheckpoint's saver: snapshot, layout, write, commit, and undoing a failed save.

One save: the policies (or a forced stop) decided; `Saver.save` checks the
state is finite and that no sibling blocks it, captures a snapshot on the
training thread, and commits it (sync, or on the background writer): the
regular file, the `last` copy, the mirror upload, retention. The bookkeeping
a save changes (`last_saved_path`, `best_path`, the best monitored value)
is undone if its write fails, sync or background, so it always names what a
file holds.
"""

from __future__ import annotations

import os
import time
from typing import Any

import keras
import numpy as np

from keras_ckpt import atomic, keras_compat, keras_layout, registry, storage
from keras_ckpt import rng as rng_lib
from keras_ckpt import state as state_lib
from keras_ckpt.callbacks.base import StatefulCallback, non_finite_logs
from keras_ckpt.callbacks.model_checkpoint import sharded
from keras_ckpt.callbacks.model_checkpoint.fit_state import SavedAt
from keras_ckpt.jsonsafe import encode_float, encode_log
from keras_ckpt.keras_compat import print_msg
from keras_ckpt.state_checks import state_bytes_bound
from keras_ckpt.warn import warn
from keras_ckpt.writer import BackgroundWriter

__all__ = ["Saver"]


def history_of(model: Any) -> Any:
    history = getattr(model, "history", None)
    return history if isinstance(history, keras.callbacks.History) else None


def global_step(model: Any) -> int:
    """The optimizer's step count (built or not: a custom train_step builds it at its first
    apply, and a resume has given it its count before that)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return 0
    return int(keras.ops.convert_to_numpy(keras_compat.step_counter(optimizer)))


def _scalar(value: Any) -> float | str | None:
    """A log value for the metadata: a float, or None when absent or not a scalar."""
    try:
        return encode_float(None if value is None else float(value))
    except (TypeError, ValueError):
        return None


class Saver:
    """Writes the checkpoints of one ModelCheckpoint (its `owner`)."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.options = owner.options
        self.writer = BackgroundWriter() if self.options.async_write else None
        # (where, path, bookkeeping before it, (epoch, step)) of the background write
        self._in_flight: tuple[str, str, tuple, tuple] | None = None
        self._layout_cache: tuple | None = None
        # A background write's copies (where later steps would change a view): reused.
        self.buffers: state_lib.HostBuffers | None = None
        self.last_saved_path: str | None = None
        self.best_path: str | None = None
        self.last_save_seconds: float | None = None
        self.save_errors: list[str] = []

    # ------------------------------------------------------------ deciding
    def save(self, logs: dict, steps_in_epoch: int | None, force: bool = False,
             metrics: list[np.ndarray] | None = None) -> str | None:
        """Saves if the rules say so; returns the path written (regular or `last`), or None.

        `force` (a stop: a sibling's, a signal's, an exception's): save
        regardless of `save_best_only`, into the `last` file when the regular
        one is reserved for the best; nothing new if this very step is saved
        (at an epoch end: if it was saved at the epoch end, after validation).
        `metrics`: the compiled metrics' values to store (see `capture`).
        """
        owner, o, fit, model = self.owner, self.options, self.owner.fit, self.owner.model
        session = registry.current_fit(model)
        if steps_in_epoch is not None and getattr(session, "steps_uncounted", False):
            return None  # (no step count to resume from: said after the first step)
        step_now = global_step(model)
        saved = fit.saved_at
        if force and saved is not None and (saved.session, saved.step) == (session, step_now) \
                and (steps_in_epoch is not None or saved.epoch_end):
            return saved.path
        self.wait()  # the write in flight decides what the best saved value is
        epoch = fit.epoch
        value = logs.get(o.monitor)
        where = f"Epoch {epoch + 1}" + (f", step {steps_in_epoch}" if steps_in_epoch else "")
        fit.last_save_time = o.now()
        if steps_in_epoch is not None:
            # Siblings with batch-level work (TerminateOnNaN) check this step first.
            for obj in registry.objects_for(model).values():
                settle = getattr(obj, "settle_batch_end", None)
                if settle is not None:
                    settle(steps_in_epoch - 1, logs)
        bad = non_finite_logs(logs)
        if bad:
            shown = ", ".join(f"{k}={v}" for k, v in bad.items())
            warn(
                f"ModelCheckpoint: not saving at {where}: the state is not finite ({shown}). "
                "The previous checkpoints stay as they are.")
            return None
        for obj in registry.objects_for(model).values():
            reason = obj.blocks_saving() if isinstance(obj, StatefulCallback) else None
            if reason:
                if o.verbose > 0:
                    print_msg(f"\n{where}: not saving: {reason}")
                return None
        fit.last_save_step = step_now
        filepath = owner.file_path(logs, steps_in_epoch)
        save_regular = not (force and o.save_best_only)
        write_last = o.save_last or not save_regular
        undo_best = None
        if o.save_best_only and not force:
            previous = owner.best
            improved, undo_best = owner.best_only.decide(logs, epoch, steps_in_epoch)
            if improved:
                if o.verbose > 0:
                    before = "None" if previous is None else f"{previous:.5f}"
                    print_msg(f"\n{where}: {o.monitor} improved from {before} to "
                              f"{float(value):.5f}, saving model to {filepath}")
            elif improved is False:
                save_regular = False
                if o.verbose > 0:
                    print_msg(f"\n{where}: {o.monitor} did not improve from {owner.best:.5f}")
        elif o.verbose > 0:
            print_msg(f"\n{where}: saving model to {filepath}")
        if not save_regular and not write_last:
            return None
        snapshot, meta = self._capture(logs, steps_in_epoch, step_now, value, metrics)
        if owner.workers is not None:  # (a collective: on every process)
            meta[rng_lib.DIFFER_KEY] = self._rng_differs(snapshot)
        written = filepath if save_regular else owner.files.last_path
        before = (self.last_saved_path, self.best_path, fit.saved_at, undo_best)
        if save_regular:
            self.last_saved_path = filepath
            if o.save_best_only:
                self.best_path = filepath
        fit.saved_at = SavedAt(session, step_now, written, steps_in_epoch is None)
        if "shards" in snapshot.meta:  # variables split across processes: every one writes
            try:
                sharded.commit(self, filepath if save_regular else None, write_last, snapshot,
                               meta)
            except (OSError, storage.NonFiniteStateError) as e:
                self._undo(before)
                self._failed(where, filepath, e, (epoch, steps_in_epoch))
                return None
            return written
        # Everything that reads the model is done here, on the training
        # thread: on JAX the model's variables are detached while it trains.
        # Every worker reads it alike (Keras may make variables on the way: on
        # several JAX processes, a collective each).
        plan = self._write_plan()
        if not owner.writes:
            return written  # a worker beside the chief: the chief writes this state

        def commit() -> None:
            self._commit(filepath if save_regular else None, write_last, snapshot, meta, plan,
                         where)

        # Keras's own writer (the fallback) reads the live variables, not the
        # snapshot: it cannot run beside training.
        if self.writer is not None and not plan.reads_model:
            self._in_flight = (where, filepath, before, (epoch, steps_in_epoch))
            self.writer.submit(commit)
            return written
        try:
            commit()
        except (OSError, storage.NonFiniteStateError) as e:
            self._undo(before)
            self._failed(where, filepath, e, (epoch, steps_in_epoch))
            return None
        return written

    def _rng_differs(self, snapshot: state_lib.Snapshot) -> bool:
        """Whether the processes' RNG states in `snapshot` differ (said once a fit)."""
        workers = self.owner.workers
        mine = rng_lib.digest(snapshot)
        differs = workers.any(workers.from_chief(mine) != mine)
        if differs and workers.is_chief and not self.owner.fit.rng_differs_said:
            self.owner.fit.rng_differs_said = True
            warn("ModelCheckpoint: " + rng_lib.differ_message(at_resume=False))
        return differs

    def _capture(self, logs: dict, steps_in_epoch: int | None, step_now: int, value: Any,
                 metrics: list[np.ndarray] | None) -> tuple[state_lib.Snapshot, dict]:
        fit, model = self.owner.fit, self.owner.model
        loss = logs.get("loss")
        progress = {
            "epoch": fit.epoch,
            "step": steps_in_epoch if steps_in_epoch is not None else (
                step_now - fit.epoch_start_step),
            "epoch_complete": steps_in_epoch is None,
            "global_step": step_now,
            "steps_per_execution": int(getattr(model, "steps_per_execution", 1) or 1),
            # What a step means: a resume with other values would skip other batches.
            "steps_per_epoch": (self.owner.params or {}).get("steps"),
            "gradient_accumulation_steps": getattr(
                getattr(model, "optimizer", None), "gradient_accumulation_steps", None),
            "history": self._history_for(fit.epoch, logs, steps_in_epoch is None),
        }
        states = state_lib.object_states(registry.objects_for(model))
        rng = None
        if steps_in_epoch is not None:
            rng = fit.epoch_rng
            states.update(fit.epoch_data_states)
        # Synchronous: written before training goes on, so read without copies.
        # In the background: without copies only where later steps cannot
        # change what was read (TensorFlow copies on write, JAX never writes).
        copy = self.writer is not None and not state_lib.view_is_stable()
        if copy and self.buffers is None:
            self.buffers = state_lib.HostBuffers()
        snapshot = state_lib.capture(model, states, progress, rng, metrics=metrics, copy=copy,
                                     buffers=self.buffers)
        meta = {
            "monitor": self.options.monitor,
            "monitor_value": _scalar(value), "loss": _scalar(loss),
            "written_at": time.time(),
            "keras_version": keras.__version__, "backend": keras.backend.backend(),
        }
        return snapshot, meta

    # ------------------------------------------------------------ committing
    def _commit(self, regular: str | None, write_last: bool, snapshot: state_lib.Snapshot,
                meta: dict, plan: storage.Layout, where: str) -> None:
        started = time.monotonic()
        written = []
        if regular is not None:
            os.makedirs(os.path.dirname(os.path.abspath(regular)), exist_ok=True)
            self._write(regular, snapshot, {**meta, "kind": "regular"}, plan)
            written.append(regular)
            if self.options.verbose > 0 and self.options.async_write:  # (written later)
                print_msg(f"\n{where}: finished saving model to {regular}")
        if write_last:
            written.append(self._write_last(regular, snapshot, meta, plan))
        self.committed(written, started)

    def committed(self, written: list[str], started: float) -> None:
        """After a commit (of ours or `sharded.commit`): upload, the time taken, retention."""
        self.owner.files.push(written)
        self.last_save_seconds = time.monotonic() - started
        if self.options.retention:
            self.owner.files.apply_retention(self.options.retention,
                                             [self.best_path, self.last_saved_path])

    def release_buffers(self) -> None:
        """Lets go of the reused copies (the fit is over; its last write is committed)."""
        if self.buffers is not None:
            self.buffers.release()
            self.buffers = None

    def wait(self) -> None:
        """Waits for the write in flight; a failure undoes it and follows `on_save_error`."""
        if self.writer is None:
            return
        try:
            self.writer.wait()
        except (OSError, storage.NonFiniteStateError) as e:
            where, filepath, before, at = self._in_flight or ("?", "?", None, None)
            if before is not None:
                self._undo(before)
            self._failed(where, filepath, e, at)
        finally:
            self._in_flight = None

    def _undo(self, before: tuple) -> None:
        self.last_saved_path, self.best_path, self.owner.fit.saved_at, undo_best = before
        self.owner.best_only.undo(undo_best)

    def _failed(self, where: str, filepath: str, error: Exception, at: Any = None) -> None:
        if isinstance(error, storage.NonFiniteStateError):  # refused: never a checkpoint
            warn(f"ModelCheckpoint: not saving at {where}: {error}. The previous "
                 "checkpoints stay as they are.")
            for obj in registry.objects_for(self.owner.model).values():
                found = getattr(obj, "non_finite_state", None)  # TerminateOnNaN acts on it
                if found is not None and at is not None:
                    found(error.variable, *at)
            return
        message = (f"ModelCheckpoint: saving at {where} to {filepath} FAILED: "
                   f"{type(error).__name__}: {str(error).rstrip('.')}. The previous "
                   "checkpoints are intact and no partial file was left.")
        self.save_errors.append(message)
        if self.options.on_save_error == "raise":
            raise error
        print_msg(f"\n{message} Training continues (on_save_error='warn').")
        warn(message)

    def _keras_writer(self) -> Any:
        model = self.owner.model
        if self.options.save_weights_only:
            return lambda path: model.save_weights(path, overwrite=True)
        return lambda path: model.save(path, overwrite=True)

    def _write_plan(self) -> storage.Layout:
        """The file layout of this save (a `storage.Layout`), read from the model now."""
        model = self.owner.model
        if self.options.save_weights_only:
            layout = self._keras_layout()
            if layout is not None:
                return storage.OnePassWeights(layout)
        elif self.options.filepath.endswith(".keras") and not keras_layout.has_assets(model):
            archive = keras_layout.archive_members(model)
            layout = self._keras_layout() if archive is not None else None
            if layout is not None:
                return storage.OnePassArchive(layout, archive)
        return storage.KerasPartFirst(self._keras_writer())

    def _write(self, filepath: str, snapshot: state_lib.Snapshot, meta: dict,
               plan: storage.Layout) -> None:
        fit = self.owner.fit
        if os.path.isdir(filepath):
            raise IsADirectoryError(
                f"ModelCheckpoint: filepath {filepath!r} is a directory; give a file name.")
        if filepath not in fit.written and os.path.exists(filepath):
            try:  # (a file no checkpoint of this model could be is not read)
                storage.read_meta(filepath, state_bytes=state_bytes_bound(self.owner.model))
            except storage.CorruptCheckpointError as e:
                warn(f"ModelCheckpoint: replacing {filepath}, which is not a valid "
                     f"keras-ckpt checkpoint ({e}).")
        storage.write(filepath, snapshot, layout=plan, meta=meta, fsync=self.options.fsync,
                      compression=self.options.compression)
        fit.written.add(filepath)

    def learn_layout(self) -> None:
        """Learns Keras's layout at train begin where the model is complete (its optimizer
        built: a resumed fit, a later fit), so a process's first save does not pay for it.
        On every worker, the chief's or not: Keras makes a throwaway optimizer the first
        time (its variables are collectives on several JAX processes)."""
        optimizer = getattr(self.owner.model, "optimizer", None)
        if getattr(optimizer, "built", False) and getattr(self.owner.model, "built", False) \
                and (self.options.save_weights_only or self.options.filepath.endswith(".keras")):
            self._keras_layout()

    def _keras_layout(self) -> keras_layout.Layout | None:
        """Keras's `.weights.h5` layout for this model (cached while the variables stay)."""
        model = self.owner.model
        optimizer = getattr(model, "optimizer", None)
        variables = [("model", list(model.variables)),
                     ("optimizer", list(getattr(optimizer, "variables", []) or []))]
        key = tuple(id(v) for _, group in variables for v in group)
        if self._layout_cache is not None and self._layout_cache[0] == key:
            return self._layout_cache[1]
        names = {id(v): f"{g}/{i:05d}" for g, group in variables for i, v in enumerate(group)}
        layout = keras_layout.layout(model, names)
        if layout is not None and all(e.array is not None for e in layout.entries):
            self._layout_cache = (key, layout)  # every dataset is a variable: reusable
        return layout

    def _write_last(self, regular: str | None, snapshot: state_lib.Snapshot, meta: dict,
                    plan: storage.Layout) -> str:
        last = self.owner.files.last_path
        if regular is not None:
            # The newest regular file is the same state: link it into place.
            tmp = atomic.temp_path(last, "link")
            try:
                os.link(regular, tmp)
                os.replace(tmp, last)
                return last
            except OSError:
                if os.path.exists(tmp):
                    os.remove(tmp)
        self._write(last, snapshot, {**meta, "kind": "last"}, plan)
        return last

    def _history_for(self, epoch: int, logs: dict, epoch_complete: bool) -> dict:
        history = history_of(self.owner.model)
        values = {k: list(v) for k, v in (history.history if history else {}).items()}
        epochs = list(history.epoch) if history else []
        if epoch_complete and epoch not in epochs:
            # Keras's History runs after us: add this epoch's logs ourselves.
            epochs.append(epoch)
            for k, v in logs.items():
                values.setdefault(k, []).append(v)
        return {"epoch": epochs,
                "values": {k: [encode_log(x) for x in v] for k, v in values.items()}}
