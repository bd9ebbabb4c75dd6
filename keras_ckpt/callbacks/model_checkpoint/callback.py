"""`ModelCheckpoint`: Keras's checkpoint callback, saving the whole training state.

The callback only wires Keras's hooks to its collaborators (docs/architecture.md):
`options` (arguments), `policies` (when to save), `saver` (how), `directory`
(where, and upkeep), `resume`, `preemption` and `exception_save`; everything a
fit acquires is registered with the fit's session and undone when it closes.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from typing import Any

import keras

from keras_ckpt import inputs, manager, multi_worker, registry
from keras_ckpt import state as state_lib
from keras_ckpt.callbacks.base import MonitorAttributes, StatefulCallback
from keras_ckpt.callbacks.model_checkpoint import policies, sharded
from keras_ckpt.callbacks.model_checkpoint.auto_freq import AutoFrequency
from keras_ckpt.callbacks.model_checkpoint.directory import CheckpointDirectory, local_template
from keras_ckpt.callbacks.model_checkpoint.exception_save import ExceptionSave
from keras_ckpt.callbacks.model_checkpoint.fit_state import FitState
from keras_ckpt.callbacks.model_checkpoint.options import legacy_argument_error, parse_options
from keras_ckpt.callbacks.model_checkpoint.preemption import Preemption
from keras_ckpt.callbacks.model_checkpoint.resume import restore_history_epochs, resume
from keras_ckpt.callbacks.model_checkpoint.saver import Saver, global_step
from keras_ckpt.fit import keras_callbacks
from keras_ckpt.fit.protocol import keep_default_hooks, overrides, steps_done
from keras_ckpt.monitor import Monitor
from keras_ckpt.retention import KeepBest

__all__ = ["ModelCheckpoint"]

_BATCH_HOOKS = ("on_train_batch_end", "on_test_batch_end")
_SHOWN = ("monitor", "verbose", "save_best_only", "save_weights_only", "mode", "save_freq",
          "save_overhead", "initial_value_threshold", "resume", "save_interval", "save_last",
          "fsync", "preemption", "preemption_signals", "save_on_exception", "on_save_error",
          "if_none_valid", "lock", "async_write", "compression")
_ARGUMENTS = frozenset(_SHOWN) | {"retention", "clock"}


class ModelCheckpoint(MonitorAttributes, StatefulCallback):
    """Saves the whole training state, crash-safely, and resumes from it.

    A drop-in for `keras.callbacks.ModelCheckpoint` (same arguments, defaults,
    file names and moments; Keras reads the files as before) whose files also
    carry the full training state: every model and optimizer variable, the
    compiled metrics' state, epoch, step, history, RNG states and the other
    keras-ckpt callbacks' states. A write is fsynced, checksummed and renamed
    into place: complete or invisible. A non-finite state is never written.
    Under `MultiWorkerMirroredStrategy` only the chief writes.

    Args:
        filepath: path template, formatted with `epoch` (1-based), `batch`
            (with an integer `save_freq`) and the log keys, e.g.
            `"ckpt/{epoch:02d}-{val_loss:.2f}.keras"`. Ends in `.keras` (or
            legacy `.h5`), or `.weights.h5` with `save_weights_only`. A URL
            (`gs://bucket/run/{epoch}.keras`, placeholders in the file name
            only) is written and verified in a local mirror, `directory`, then
            uploaded; a fit first downloads what the mirror lacks.
        monitor: quantity compared by `save_best_only`.
        verbose: 0 (silent) or 1 (a message for each action).
        save_best_only: save only when `monitor` improves on the best saved.
        save_weights_only: write a `.weights.h5` file `load_weights` reads.
        mode: `"auto"`, `"min"` or `"max"`, for `monitor` (else: warns, `"auto"`).
        save_freq: `"epoch"`, or save every that many training steps, or
            `"auto"`: every `n` steps, `n` chosen from the measured time of a
            save and of a step so that saves block at most `save_overhead` of
            training time, and a kill loses at most `save_interval` seconds of
            training (an hour by default). `verbose=1` and `inspect` say what
            it chose.
        save_overhead: with `save_freq="auto"`, the largest share of training
            time spent blocked on saves (default 0.02, 2%).
        initial_value_threshold: a value the monitor must beat first.
        resume: False (Keras's behaviour); True: restore the newest valid
            checkpoint in the directory at train begin and continue from its
            epoch and step; or the path of one checkpoint to continue from.
        retention: policies (`KeepLast`, `KeepBest`, `KeepEvery`); a file this
            callback wrote is deleted once none keeps it (the newest stays).
        save_interval: also save when this many seconds (or a `timedelta`)
            have passed since the last save, checked after each step (with
            `save_freq="auto"`: the most training a kill may lose).
        save_last: also keep `last.keras` / `last.weights.h5`, the newest state.
        clock: a function returning seconds, for `save_interval` and
            `save_freq="auto"` (default `time.monotonic`).
        fsync: make each write durable before renaming it into place.
        preemption: `"exit"`: on a `preemption_signals` signal during `fit`,
            finish the step, save it, stop, run every `on_train_end`, then exit
            with 128 + the signal number; `"return"`: the same, `fit` returns;
            None: Keras's behaviour; `"auto"`: `"exit"` with `resume`. A second
            signal acts at once. The handlers are put back when `fit` ends.
        preemption_signals: the signals `preemption` handles (e.g. `"SIGUSR1"`).
        save_on_exception: when an exception escapes a step, save the last
            completed step before it propagates.
        on_save_error: `"warn"`: a failed write warns, training goes on;
            `"raise"`: it raises. The previous checkpoints stay intact.
        if_none_valid: with `resume=True` and files of which none is valid:
            `"raise"` or `"start_fresh"` (warn, train from scratch).
        lock: hold the directory's lock during `fit` (`DirectoryInUseError`
            for a second process).
        async_write: write on a background thread (one write in flight; a
            failure is reported at the next save or train end).
        compression: None, `"gzip"` or `"lzf"`, for the arrays.

    Raises:
        ValueError, TypeError: an invalid argument (at construction).
        DirectoryInUseError: at train begin, another process holds the lock.
        CorruptCheckpointError: at train begin, no valid checkpoint to resume.

    Example:
    ```python
    checkpoint = keras_ckpt.ModelCheckpoint(
        "ckpt/epoch-{epoch:03d}.keras", resume=True,
        retention=[keras_ckpt.KeepLast(3)])
    model.fit(x, y, epochs=100, callbacks=[checkpoint])
    # Kill the process at any moment and run the same script again.
    ```
    """

    def __init__(
        self, filepath: str | os.PathLike, monitor: str = "val_loss", verbose: int = 0,
        save_best_only: bool = False, save_weights_only: bool = False, mode: str = "auto",
        save_freq: str | int = "epoch", initial_value_threshold: float | None = None, *,
        save_overhead: float | None = None,
        resume: bool | str | os.PathLike = False, retention: Sequence[Any] | None = None,
        save_interval: float | datetime.timedelta | None = None, save_last: bool = False,
        clock: Callable[[], float] | None = None, fsync: bool = True,
        preemption: str | None = "auto",
        preemption_signals: Sequence[str | int] = ("SIGTERM", "SIGINT"),
        save_on_exception: bool = False, on_save_error: str = "warn",
        if_none_valid: str = "raise", lock: bool = True, async_write: bool = False,
        compression: str | None = None, **legacy: Any,
    ) -> None:
        arguments = {k: v for k, v in locals().items() if k in _ARGUMENTS}
        super().__init__()
        if legacy:
            raise legacy_argument_error(legacy)
        if not isinstance(filepath, (str, os.PathLike)):
            raise TypeError(f"`filepath` must be a string or path; got {filepath!r}.")
        # A URL is written and verified in a local mirror, then uploaded.
        self.filepath, self.remote_filepath, mirror = local_template(os.fspath(filepath))
        self.options = parse_options(self.filepath, owner=type(self).__name__, **arguments)
        for name in _SHOWN:
            setattr(self, name, getattr(self.options, name))
        self.retention = list(self.options.retention)
        self._fields = manager.template_fields(self.filepath)
        self._metric_fields = [f for f in self._fields if f not in ("epoch", "batch")]
        self._monitor = Monitor(monitor, self.mode, initial_value_threshold=initial_value_threshold,
                                owner="ModelCheckpoint")
        if self.save_best_only:  # as Keras's: without the value, every epoch is saved
            self._monitor.missing_hint = (" Without it, save_best_only saves at every save "
                                          "moment, as Keras's ModelCheckpoint does.")
        self.best_only = policies.BestOnly(self._monitor)
        self._policies = policies.policies_for(save_freq, self.options.save_interval,
                                               self.options.now, self.options.save_overhead)
        self.auto_freq = next((p for p in self._policies if isinstance(p, AutoFrequency)), None)
        self.files = CheckpointDirectory(self.filepath, mirror, self.options.lock, verbose)
        self.directory = self.files.path
        self._mirror = mirror
        self.saver = Saver(self)
        self.stops = Preemption(self)  # signals (with `preemption`) and siblings' stops
        self._signals = bool(self.options.preemption)
        self.exception_save = ExceptionSave(self) if save_on_exception else None
        self.resumed_from: manager.CheckpointInfo | None = None
        self.workers: multi_worker.Workers | None = None
        self.writes = True  # False on a worker beside the chief
        self._step_policies = [p for p in self._policies if p.batch_level]
        self._epoch_end_saves = save_freq == "epoch" or any(  # KeepBest needs epoch ends
            isinstance(p, KeepBest) for p in self.retention)
        # Batch hooks see the model's state on TF; on JAX/torch they may run on a pool.
        self.hooks_see_state = keras.backend.backend() == "tensorflow"
        self.fit = FitState()
        # Batch hooks only when needed: Keras keeps its async dispatch (JAX, torch).
        keep_default_hooks(self, ModelCheckpoint, on_train_batch_end=bool(
            self._step_policies or self._metric_fields or self._signals),
            on_test_batch_end=self._signals)

    last_saved_path = property(lambda self: self.saver.last_saved_path)
    best_path = property(lambda self: self.saver.best_path)
    save_errors = property(lambda self: self.saver.save_errors)
    last_save_seconds = property(lambda self: self.saver.last_save_seconds)
    preempted_by = property(lambda self: self.stops.preempted_by)

    @property
    def async_safe(self) -> bool:
        """Keras may run batch hooks on its thread pool unless ours read the model.

        True with preemption alone (the hook only flags a stop). A subclass
        that overrides a batch hook gets Keras's default (synchronous).
        """
        return not (self._step_policies or self._metric_fields
                    or overrides(self, ModelCheckpoint, _BATCH_HOOKS)
                    or multi_worker.several_jax_processes())

    def get_state(self) -> dict:
        """The callback's own state: its comparator, last save step, `"auto"` estimates."""
        state = {"monitor": self._monitor.get_state(), "last_save_step": self.fit.last_save_step}
        if self.auto_freq is not None:
            state["save_freq_auto"] = self.auto_freq.get_state()
        return state

    def set_state(self, state: dict) -> None:
        """Restores `get_state()`'s output."""
        self._monitor.set_state(state["monitor"])
        self.fit.last_save_step = int(state.get("last_save_step", 0))
        if self.auto_freq is not None and isinstance(state.get("save_freq_auto"), dict):
            self.auto_freq.set_state(state["save_freq_auto"])

    def get_config(self) -> dict:
        """The constructor arguments (as Keras callbacks report them)."""
        return self.options.config(self.remote_filepath or self.filepath)

    def handles_signal(self, signum: int) -> bool:
        """Whether this callback turns `signum` into a graceful stop during `fit`."""
        return self._signals and int(signum) in self.options.signal_numbers

    # ------------------------------------------------------------ hooks
    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        model, session = self.model, self.fit_session
        self.fit = self.fit.next_fit(global_step(model), bool(self._metric_fields))
        policies.bind_retention(self.retention, self._monitor, model, self.save_best_only)
        # Several worker processes: all take the same snapshots (reading the
        # metrics is a collective), only the chief writes.
        self.workers = multi_worker.workers_of(model)
        split = [] if self.workers is None else self.workers.check_model(
            model, "ModelCheckpoint", refuse=None if self.files.mirror is None else
            "it writes to a URL directory (shard files: local or shared directories only)")
        sharded.announce(split, self.workers)
        self.writes = self.workers is None or self.workers.is_chief
        timed = "save_freq='auto'" if self.auto_freq else "`save_interval`"
        if self.workers is not None and (self.options.save_interval or self.auto_freq):
            raise ValueError(
                f"ModelCheckpoint: {timed} is not supported with several workers "
                f"({self.workers.count}): each worker's clock would decide a different "
                "step. Use `save_freq` (steps) or 'epoch'.")
        if self.auto_freq is not None:
            self.auto_freq.fit_begin()
        if self.writes:
            self.files.check_writable()
            self.files.acquire(self)
            session.on_close("directory lock", self.files.release)
            self.files.clean_temporaries()
        session.on_close("background writer", self._close_writer)
        self.files.pull()
        if self.options.resume:
            # What a resume could not replay, said now.
            inputs.check_input(model, keras_callbacks.lost_on_resume(session))
            resume(self)
        self.saver.learn_layout()  # now, not in the first save's blocking time
        self.fit.last_save_time = self.options.now()
        self.fit.in_fit = True
        if self.exception_save is not None:
            self.exception_save.install(session)
        if self._signals:
            self.stops.install(session)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        fit, model = self.fit, self.model
        if not self.fit_session.watches_hooks:  # else the session did, before every hook
            self.fit_session.release_initial_epoch()
        if self.exception_save is not None:
            self.exception_save.epoch_begin()
        fit.epoch = epoch
        if self.auto_freq is not None:
            self.auto_freq.epoch_begin()
        fit.epoch_start_step = global_step(model) - fit.resume_step
        fit.resume_step = 0
        # A save inside this epoch (periodic, or a sibling's stop) must let a
        # resume replay the epoch's data order: keep the RNG and data-helper
        # states of its start.
        fit.epoch_rng = state_lib.capture_rng()
        fit.epoch_data_states = state_lib.object_states(
            {k: o for k, o in registry.objects_for(model).items() if k.startswith("data:")})
        restore_history_epochs(model, fit)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        fit = self.fit
        if fit.fields_unchecked:  # after the first step: the placeholders must be log keys
            fit.fields_unchecked = False
            self.files.check_fields(logs or {}, self._metric_fields)
        if self.replaying(batch):
            return
        done = steps_done(self.params, batch)
        if self._signals and self.stops.train_batch_end(done, logs):
            return
        if not self._step_policies:
            return
        step, auto = fit.epoch_start_step + done, self.auto_freq
        if auto is not None:
            auto.observe_step(step)
        if any(p.due(step, fit.last_save_step, fit.last_save_time) for p in self._step_policies):
            started = self.options.now()
            if self.saver.save(logs or {}, steps_in_epoch=done) is not None and auto:
                # A background write (the one before, just waited for) costs its time too.
                behind = (self.saver.last_save_seconds or 0.0) if self.async_write else 0.0
                auto.observe_save(self.options.now() - started + behind, verbose=self.verbose)

    def on_test_begin(self, logs: dict | None = None) -> None:
        # Validation resets the compiled metrics: keep the epoch's training
        # values, for a checkpoint a signal may ask for during validation.
        fit = self.fit
        if fit.in_fit and (self._signals or self.exception_save is not None
                           or not self.hooks_see_state):
            fit.train_metrics = [keras.ops.convert_to_numpy(v).copy()
                                 for v in self.model.metrics_variables]
            if fit.deferred is not None:  # a stop cut the epoch short: save, skip validation
                self.model.stop_evaluating = True
                self.stops.save_deferred(metrics=fit.train_metrics)

    def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._signals:
            self.stops.test_batch_end()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        fit, stops = self.fit, self.stops
        self.fit_session.replay_until = -1
        train_metrics, fit.train_metrics = fit.train_metrics, None
        pending = self._signals and stops.pending() and stops.preempted_by is None
        if registry.cut_short(self.model) == epoch:
            # A stop cut the epoch short: its mid-epoch checkpoint is written
            # (at the stop on TensorFlow, now on JAX and torch).
            if fit.deferred is not None:
                self.stops.save_deferred(metrics=train_metrics)
            elif pending:
                stops.stop(f"during epoch {epoch + 1}")
            return
        # The other keras-ckpt callbacks (and Keras's stateful ones) finish the
        # epoch first, so a checkpoint holds their state after it, whatever the
        # order. Without epoch-end saves, an epoch after which a callback stops
        # training is saved (a sibling's stop), and the fit's last epoch
        # rewrites its last step's checkpoint when that is this step's: else
        # their newest checkpoint predates the validation and the decision, and
        # a re-run would validate and decide again, not say it had finished.
        for obj in registry.objects_for(self.model).values():
            if hasattr(obj, "settle_epoch_end") and not isinstance(obj, ModelCheckpoint):
                obj.settle_epoch_end(epoch, logs)
        # (With epoch-end saves, a stop's epoch is saved by the usual rules:
        # with save_best_only, a best epoch that also stops is the best file.)
        stopping = bool(getattr(self.model, "stop_training", False)) and not self._epoch_end_saves
        if self._epoch_end_saves or pending or stopping or self._rewrites_last_step(epoch, logs):
            self.saver.save(logs or {}, steps_in_epoch=None, force=pending or stopping)
        if pending:
            stops.stop(f"after epoch {epoch + 1}")

    def _rewrites_last_step(self, epoch: int, logs: dict | None) -> bool:
        """The fit's last epoch ends on a step saved before its validation, under this name."""
        saved, o = self.fit.saved_at, self.options
        return (epoch + 1 == (self.params or {}).get("epochs") and not o.save_best_only
                and saved is not None and not saved.epoch_end
                and (saved.session, saved.step) == (registry.current_fit(self.model),
                                                    global_step(self.model))
                and saved.path == self.file_path(logs or {}, None))

    def on_train_end(self, logs: dict | None = None) -> None:
        session = self.fit_session
        restore_history_epochs(self.model, self.fit)  # a finished run trained no epoch
        if self._signals and self.preemption == "exit" and self.stops.catcher.pending is not None:
            session.exit_status = 128 + self.stops.catcher.pending
        try:
            self.saver.wait()  # the last save is committed before fit returns
        except BaseException as e:
            if not session.watches_hooks:
                session.close(e)
            raise
        if not session.watches_hooks:  # the fit's CallbackList was not found: close here
            session.close()
            if session.exit_status is not None:
                raise SystemExit(session.exit_status)

    def save_now(self, logs: dict | None, steps_in_epoch: int) -> str | None:
        """Writes a checkpoint at this step (a sibling is stopping training here).

        Returns:
            The path written and committed, or None if nothing could be saved
            (non-finite, a failed write), or if the save waits for the next
            synchronous hook (JAX and torch; see `last_saved_path` after `fit`).
        """
        if not self.hooks_see_state:
            self.stops.defer(logs)
            return None
        written = self.saver.save(logs or {}, steps_in_epoch=steps_in_epoch, force=True)
        self.saver.wait()
        return written if self.fit.saved_at and self.fit.saved_at.path == written else None

    def file_path(self, logs: dict, steps_in_epoch: int | None) -> str:
        """The file name of a save now (the template filled from the logs)."""
        if steps_in_epoch is None and "batch" in self._fields:  # an epoch end: all its steps
            steps_in_epoch = global_step(self.model) - self.fit.epoch_start_step
        return self.files.file_path(logs, self.fit.epoch, steps_in_epoch)

    def _close_writer(self) -> None:
        if self.saver.writer is not None:
            self.saver.writer.drain()  # commit what is in flight (its error stays for later)
        self.saver.release_buffers()
        self.fit.in_fit = False
