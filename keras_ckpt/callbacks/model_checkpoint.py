"""`ModelCheckpoint`: Keras's checkpoint callback, saving the whole training state."""

from __future__ import annotations

import datetime
import os
import signal
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np

from keras_ckpt import (
    dirlock,
    keras_layout,
    manager,
    multi_worker,
    registry,
    remote,
    storage,
)
from keras_ckpt import state as state_lib
from keras_ckpt.callbacks.base import (
    StatefulCallback,
    guard_step_functions,
    non_finite_logs,
    print_msg,
    unguard_step_functions,
)
from keras_ckpt.jsonsafe import decode_float, encode_float
from keras_ckpt.monitor import Monitor
from keras_ckpt.preemption import SignalCatcher, exit_status, parse_signals
from keras_ckpt.validation import check_bool, check_choice, check_number
from keras_ckpt.writer import BackgroundWriter

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

    Under `tf.distribute.MultiWorkerMirroredStrategy` every worker takes the
    same snapshots and only the chief writes; all workers resume from the
    chief's checkpoint (a shared directory) and a signal that reaches one
    worker stops all at the same step (docs/backends.md).

    Args:
        filepath: path template, formatted with `epoch` (1-based), `batch`
            (with an integer `save_freq`) and the log keys, e.g.
            `"ckpt/{epoch:02d}-{val_loss:.2f}.keras"`. Must end in `.keras`
            (or legacy `.h5`), or in `.weights.h5` with `save_weights_only`.
            A URL (`gs://bucket/run/{epoch}.keras`; any scheme `tf.io.gfile`
            supports) is served by a local mirror, `directory`: files are
            written and verified there, then uploaded (a temporary name,
            then a rename); a fit first downloads what the mirror lacks.
            Placeholders go in the file name only. The directory lock then
            covers this machine only.
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
        preemption: what a preemption signal (`preemption_signals`) during
            `fit` does. `"exit"`: finish the current step, write a checkpoint,
            stop, let every callback's `on_train_end` run, then exit with
            status 128 + the signal number (143 for SIGTERM); `"return"`: the
            same, but `fit` returns normally; None: signals are left alone
            (Keras's behaviour). `"auto"` (default): `"exit"` with `resume`,
            None without. A second signal while stopping acts at once.
            Handlers are installed in the main thread only, and the previous
            ones are put back when `fit` ends.
        preemption_signals: the signals `preemption` handles, by name or
            number (e.g. add `"SIGUSR1"` for SLURM's `--signal`).
        save_on_exception: when an exception escapes a training or validation
            step (a data error, an out-of-memory, a `KeyboardInterrupt`),
            write a checkpoint of the last completed step before it
            propagates. Exceptions raised by other callbacks are not seen.
        on_save_error: `"warn"` (default): a failed write (disk full,
            permission lost) warns loudly and training goes on; `"raise"`:
            it raises. Either way the previous checkpoints stay intact and no
            temporary file is left.
        if_none_valid: with `resume=True`, what to do when the directory
            holds checkpoint files but none is valid: `"raise"` (default) or
            `"start_fresh"` (warn and train from scratch). A directory with no
            checkpoint files always starts fresh.
        lock: hold a lock on the checkpoint directory during `fit`, so that a
            second process training into it gets a clear error
            (`DirectoryInUseError`). A crashed process never leaves it held.
        async_write: write, fsync and rename on a background thread; the
            training thread only takes the snapshot (without copies on
            TensorFlow and JAX, where later steps cannot change it; one copy
            elsewhere). At most one write is in flight: the next save waits
            for it (every requested checkpoint is written; none is skipped).
            A failed write is reported at the next save or at train end,
            following `on_save_error`; `on_train_end`, an exception out of
            `fit` and interpreter exit all wait for the write to commit.
        compression: None (default: fastest), `"gzip"` or `"lzf"`: compress
            the arrays (and Keras's datasets in the same file). Smaller files
            for compressible states, slower saves; Keras reads them as usual.

    Raises:
        ValueError, TypeError: an invalid argument (at construction).
        DirectoryInUseError: at train begin, another process holds the
            directory's lock.
        CorruptCheckpointError: at train begin with `resume`, no valid
            checkpoint among the directory's files (`if_none_valid="raise"`).

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
        preemption: str | None = "auto",
        preemption_signals: Sequence[str | int] = ("SIGTERM", "SIGINT"),
        save_on_exception: bool = False,
        on_save_error: str = "warn",
        if_none_valid: str = "raise",
        lock: bool = True,
        async_write: bool = False,
        compression: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(filepath, (str, os.PathLike)):
            raise TypeError(f"`filepath` must be a string or path; got {filepath!r}.")
        self.filepath = os.fspath(filepath)
        # A URL: written and verified in a local mirror, then uploaded (remote.py).
        self.remote_filepath: str | None = None
        self._mirror: remote.Mirror | None = None
        if remote.is_remote(self.filepath):
            url, name = self.filepath.rsplit("/", 1)
            if manager.template_fields(url):
                raise ValueError(
                    f"`filepath` {self.filepath!r}: with a URL, placeholders may only be in "
                    "the file name, not in the directory.")
            self._mirror = remote.Mirror(url)
            self.remote_filepath = self.filepath
            self.filepath = os.path.join(self._mirror.local, name)
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
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"`monitor` must be a metric name such as 'val_loss'; got {monitor!r}.")
        check_number("verbose", verbose, minimum=0, integer=True)
        for name, value in (("save_best_only", save_best_only),
                            ("save_weights_only", save_weights_only), ("save_last", save_last),
                            ("fsync", fsync), ("save_on_exception", save_on_exception),
                            ("lock", lock), ("async_write", async_write)):
            check_bool(name, value)
        check_choice("preemption", preemption, ("auto", "exit", "return", None))
        signals = parse_signals("preemption_signals", preemption_signals)
        check_choice("on_save_error", on_save_error, ("warn", "raise"))
        check_choice("if_none_valid", if_none_valid, ("raise", "start_fresh"))
        check_choice("compression", compression, (None, "gzip", "lzf"))
        if preemption == "auto":
            preemption = "exit" if resume else None
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
        self.preemption = preemption
        self.preemption_signals = tuple(signal.Signals(n).name for n in signals)
        self.save_on_exception = save_on_exception
        self.on_save_error = on_save_error
        self.if_none_valid = if_none_valid
        self.lock = lock
        self.async_write = async_write
        self.compression = compression
        self._writer = BackgroundWriter() if async_write else None
        self._in_flight: tuple[str, str] | None = None
        self._catcher = SignalCatcher(signals, self._on_signal,
                                      lambda _: self._abandon_fit()) if preemption else None
        self.preempted_by: str | None = None
        self.save_errors: list[str] = []
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
        self._layout_cache: tuple | None = None
        self._workers: multi_worker.Workers | None = None
        self._writes = True  # False on a worker beside the chief
        self._batch_level = save_freq != "epoch" or save_interval is not None
        self._metric_fields = [f for f in self._fields if f not in ("epoch", "batch")]
        if self._batch_level or self._metric_fields or self._catcher is not None:
            self.on_train_batch_end = self._on_train_batch_end
        # On TensorFlow batch hooks run on the training thread with the
        # model's state in place. On JAX and torch Keras may run them on a
        # thread pool while the next step trains: a stop found there saves at
        # the next synchronous hook (validation begin or epoch end).
        self._hooks_see_state = keras.backend.backend() == "tensorflow"
        # With preemption alone, the batch hook only reads a flag and, on the
        # backends that dispatch batch hooks on a thread pool (JAX, torch),
        # only asks training to stop: Keras may keep that dispatch on.
        self.async_safe = not (self._batch_level or self._metric_fields)
        if self._catcher is not None or save_on_exception or not self._hooks_see_state:
            self.on_test_begin = self._on_test_begin
        if self._catcher is not None:
            self.on_test_batch_end = self._on_test_batch_end
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
            "filepath": self.remote_filepath or self.filepath, "monitor": self.monitor,
            "verbose": self.verbose,
            "save_best_only": self.save_best_only, "save_weights_only": self.save_weights_only,
            "mode": self.mode, "save_freq": self.save_freq,
            "initial_value_threshold": self.initial_value_threshold,
            "resume": self.resume, "save_interval": self.save_interval,
            "save_last": self.save_last, "fsync": self.fsync,
            "preemption": self.preemption, "preemption_signals": list(self.preemption_signals),
            "save_on_exception": self.save_on_exception, "on_save_error": self.on_save_error,
            "if_none_valid": self.if_none_valid, "lock": self.lock,
            "async_write": self.async_write, "compression": self.compression,
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
        self._guards: list[tuple[str, Any, Any]] = []
        self._epoch_counters: list[np.ndarray] | None = None
        self._counter_step: list[np.ndarray] | None = None
        self._trained_calls = 0
        self._replay_calls = 0
        self._last_logs: Any = None
        self._train_metrics: list[np.ndarray] | None = None
        self._saved_at: tuple[Any, int, str | None] | None = None
        self._deferred: dict | None = None  # logs of a stop whose save waits
        self._written: set[str] = set()
        self._in_fit = False

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
        # Several worker processes: all take the same snapshots (reading
        # the metrics is a collective), only the chief writes.
        self._workers = multi_worker.workers_of(model)
        self._writes = self._workers is None or self._workers.is_chief
        if self._workers is not None and self.save_interval is not None:
            raise ValueError(
                "ModelCheckpoint: `save_interval` is not supported with several workers "
                f"({self._workers.count}): each worker's clock would decide a different "
                "step. Use `save_freq` (steps) or 'epoch'.")
        if self._writes:
            self._check_filepath()
        if self.lock and self._writes:
            dirlock.acquire(self.directory, self)
        try:
            if self._writes:
                self._clean_temporaries()
            if self._mirror is not None:
                # The mirror holds what the remote directory holds: resume and
                # retention then see the same files as in a local directory.
                fetched = self._mirror.pull(self._own_name)
                if fetched and self.verbose > 0:
                    print_msg(f"ModelCheckpoint: downloaded {len(fetched)} file(s) from "
                              f"{self._mirror.url} to {self.directory}.")
            if self.resume:
                self._resume()
        except BaseException:
            self._release()
            raise
        self._last_save_time = self._clock()
        self._in_fit = True
        self.preempted_by = None
        self._callback_list = _calling_callback_list()
        if self.save_on_exception:
            self._install_exception_guards()
        if self._catcher is not None:
            self._catcher.install()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self._guards:
            # Only TensorFlow fetches the batch inside the step (see _counters).
            self._epoch_counters = self._read_counters() if self._hooks_see_state else None
            self._trained_calls = 0
            spe = int(getattr(self.model, "steps_per_execution", 1) or 1)
            self._replay_calls = max(0, self._fit.replay_until) // spe
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
        if self.replaying(batch):
            return
        if self._catcher is not None:
            self._last_logs = logs
            if self._signal_pending() and self.preempted_by is None:
                if self._hooks_see_state:
                    self._preempt(logs or {}, steps_in_epoch=batch + 1)
                else:
                    self._defer_stop(logs)
                return
        if not self._batch_level:
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
        train_metrics, self._train_metrics = self._train_metrics, None
        pending = self._catcher is not None and self._signal_pending() \
            and self.preempted_by is None
        if registry.cut_short(self.model) == epoch:
            # A stop cut the epoch short: its mid-epoch checkpoint is written
            # (at the stop on TensorFlow, now on JAX and torch).
            if self._deferred is not None:
                self._save_deferred(metrics=train_metrics)
            elif pending:
                self._stop_for_signal(f"during epoch {epoch + 1}")
            return
        if self.save_freq == "epoch" or pending:
            self._settle_siblings(epoch, logs)
            self._save(logs or {}, steps_in_epoch=None, force=pending)
        if pending:
            self._stop_for_signal(f"after epoch {epoch + 1}")

    # ------------------------------------------------------------ preemption
    def handles_signal(self, signum: int) -> bool:
        """Whether this callback turns `signum` into a graceful stop during `fit`."""
        return self._catcher is not None and int(signum) in self._catcher.signals

    def _signal_pending(self) -> bool:
        """Whether a stop signal is pending: here, or (several workers) on any worker.

        With several workers every one calls this at the same hooks (train
        batch end, epoch end), and a worker the signal did not reach adopts
        it, so all stop at the same step. Validation does not look: a signal
        that arrives there is taken at the epoch's end.
        """
        pending = self._catcher.pending
        if self._workers is None:
            return pending is not None
        # One all-reduce: 1000 per signalled worker, plus its signal number.
        total = int(round(self._workers.sum(0 if pending is None else 1000 + pending)))
        signalled = total // 1000
        if signalled and pending is None:
            self._catcher.pending = pending = (total - 1000 * signalled) // signalled
        return pending is not None

    def _on_signal(self, signum: int) -> None:
        if self.verbose > 0:
            print_msg(f"\nModelCheckpoint: {signal.Signals(signum).name} received; saving and "
                      "stopping after the current step.")

    def _on_test_begin(self, logs: dict | None = None) -> None:
        # Validation resets the compiled metrics: keep the epoch's training
        # values, for a checkpoint a signal may ask for during validation.
        if self._in_fit:
            self._train_metrics = [np.array(keras.ops.convert_to_numpy(v))
                                   for v in self.model.metrics_variables]
            if self._deferred is not None:  # a stop cut the epoch short: save, skip validation
                self.model.stop_evaluating = True
                self._save_deferred(metrics=self._train_metrics)

    def _defer_stop(self, logs: Any) -> None:
        """Stops training from a batch hook that must not touch the model's state.

        Possibly on Keras's callback thread (JAX, torch): it only flags the
        stop. The checkpoint is written at the next synchronous hook, with the
        steps actually trained by then (`_save_deferred`).
        """
        with self.hook_lock:  # the first stop's logs, whichever pool thread comes first
            if self._deferred is None:
                self._deferred = dict(logs or {})
        registry.set_cut_short(self._model, self._epoch)
        self._model.stop_training = True

    def _save_deferred(self, metrics: list[np.ndarray] | None = None) -> None:
        logs, self._deferred = self._logs_dict(self._deferred), None
        steps = self._global_step() - self._epoch_start_step
        self._save(logs, steps_in_epoch=steps, force=True, metrics=metrics)
        if (self._catcher is not None and self._catcher.pending is not None
                and self.preempted_by is None):
            self._stop_for_signal(f"at epoch {self._epoch + 1}, step {steps}")

    def _on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if (self._in_fit and self._workers is None and self._catcher.pending is not None
                and self.preempted_by is None
                and self._train_metrics is not None):
            # The epoch's steps are all done; stop validating and save them.
            if not self._hooks_see_state:  # possibly on Keras's callback thread
                self._model.stop_evaluating = True
                self._defer_stop(self._last_logs)
                return
            self.model.stop_evaluating = True
            steps = self._global_step() - self._epoch_start_step
            self._preempt(self._logs_dict(self._last_logs), steps_in_epoch=steps,
                          metrics=self._train_metrics)

    def _preempt(self, logs: dict, steps_in_epoch: int,
                 metrics: list[np.ndarray] | None = None) -> None:
        # The epoch is cut short even at its last step: the checkpoint holds
        # it before validation, and a resume validates and ends it.
        registry.set_cut_short(self.model, self._epoch)
        self._save(logs, steps_in_epoch=steps_in_epoch, force=True, metrics=metrics)
        self._stop_for_signal(f"at epoch {self._epoch + 1}, step {steps_in_epoch}")

    def _stop_for_signal(self, where: str) -> None:
        name = signal.Signals(self._catcher.pending).name
        self.preempted_by = name
        self.model.stop_training = True
        saved = f"checkpoint {self.last_saved_path}" if self._saved_at else "nothing saved"
        then = ("exiting with status "
                f"{exit_status(self._catcher.pending)}" if self.preemption == "exit"
                else "fit returns")
        print_msg(f"\nModelCheckpoint: stopped by {name} {where}; {saved}; {then}.")

    def save_now(self, logs: dict | None, steps_in_epoch: int) -> str | None:
        """Writes a checkpoint at this step (a sibling is stopping training here).

        Args:
            logs: the step's logs.
            steps_in_epoch: steps done in the current epoch.

        Returns:
            The path written, or None if nothing could be saved (non-finite)
            or if the save waits for the next synchronous hook (JAX and torch,
            whose batch hooks may run beside the next training step; the path
            is then `last_saved_path` after `fit`).
        """
        if not self._hooks_see_state:
            self._defer_stop(logs)
            return None
        return self._save(logs or {}, steps_in_epoch=steps_in_epoch, force=True)

    def _settle_siblings(self, epoch: int, logs: dict | None) -> None:
        # The other keras-ckpt callbacks in this fit finish the epoch first,
        # so the checkpoint holds their state after it, whatever the order.
        for obj in registry.objects_for(self.model).values():
            if isinstance(obj, StatefulCallback) and not isinstance(obj, ModelCheckpoint):
                obj.settle_epoch_end(epoch, logs)

    def on_train_end(self, logs: dict | None = None) -> None:
        model = self.model
        self._wait_for_writer()  # the last save is committed before fit returns
        self._remove_exception_guards()
        if self._skipper is not None:
            skip, original = self._skipper
            if model.train_function is skip:  # not wrapped further by someone else
                model.train_function = original
            self._skipper = None
        registry.forget_start_epoch(model)
        self._in_fit = False
        if self._catcher is not None:
            signum = self._catcher.pending
            self._catcher.restore()
            if signum is not None and self.preemption == "exit":
                self._exit_after_callbacks(exit_status(signum), logs)
        self._release()

    def _abandon_fit(self) -> None:
        """This callback is about to raise out of `fit`: undo what on_train_end would."""
        if self._writer is not None:
            self._writer.drain()  # commit what is in flight (its error stays for later)
        self._remove_exception_guards()
        if self._catcher is not None:
            self._catcher.restore()
        self._in_fit = False
        self._release()

    def _release(self) -> None:
        if self.lock:
            dirlock.release(self.directory, self)

    def _exit_after_callbacks(self, status: int, logs: dict | None) -> None:
        """Exits once every callback of this fit has run its `on_train_end`."""
        callbacks = self._callback_list() if self._callback_list is not None else None
        if callbacks is None or self not in callbacks.callbacks:
            self._release()
            raise SystemExit(status)
        # Keras goes through its callback list by index: one appended now runs last.
        callbacks.callbacks.append(_ExitAfterTrainEnd(status, callbacks, self._release))

    # ------------------------------------------------------------ exceptions
    def _install_exception_guards(self) -> None:
        def on_error(name: str, error: BaseException) -> None:
            self._save_after_exception(error, training=name == "train_function")

        def on_result(name: str, result: Any) -> None:
            if name == "train_function":
                self._last_logs = result
                self._count_call()

        self._guards = guard_step_functions(self.model, on_error, on_result)

    def _remove_exception_guards(self) -> None:
        unguard_step_functions(self.model, self._guards)
        self._guards = []

    # A step that fails inside its graph (a bad record: the data fetch fails)
    # can still have run the parts that do not depend on the data: the
    # optimizer's step counter and the seed generators advance, the weights
    # do not. Those counters are read at each epoch's start and after its
    # first trained step; a failure puts them back where the last completed
    # step left them. TensorFlow only: JAX and torch fetch the batch before
    # the step starts (and JAX detaches the variables while it trains).
    def _counters(self) -> list:
        optimizer = getattr(self.model, "optimizer", None)
        found = [v for v in self.model.variables if v.path.endswith("seed_generator_state")]
        if optimizer is not None and getattr(optimizer, "built", False):
            found.append(optimizer.iterations)
        return found

    def _read_counters(self) -> list[np.ndarray]:
        return [np.array(keras.ops.convert_to_numpy(v)) for v in self._counters()]

    def _count_call(self) -> None:
        if self._replay_calls > 0:  # a resume consuming batches it had trained on
            self._replay_calls -= 1
            return
        self._trained_calls += 1
        if (self._trained_calls == 1 and self._counter_step is None
                and self._epoch_counters is not None):
            now, start = self._read_counters(), self._epoch_counters
            if start is not None and len(now) == len(start):
                self._counter_step = [a - b for a, b in zip(now, start, strict=True)]

    def _repair_counters(self) -> None:
        start = self._epoch_counters
        counters = self._counters()
        if start is None or len(start) != len(counters):
            return
        if self._trained_calls and self._counter_step is None:
            return
        steps = self._counter_step or [0 * a for a in start]
        expected = [a + self._trained_calls * d for a, d in zip(start, steps, strict=True)]
        for variable, value in zip(counters, expected, strict=True):
            if not np.array_equal(keras.ops.convert_to_numpy(variable), value):
                variable.assign(value)

    def _save_after_exception(self, error: BaseException, training: bool) -> None:
        if not self._in_fit:
            return
        try:
            if training:
                self._repair_counters()
            steps = self._global_step() - self._epoch_start_step
            spe = int(getattr(self.model, "steps_per_execution", 1) or 1)
            where = f"epoch {self._epoch + 1}, step {steps}"
            if steps % spe:
                warnings.warn(
                    f"ModelCheckpoint: {type(error).__name__} at {where}, inside an execution of "
                    f"steps_per_execution={spe} steps; no checkpoint can be resumed from there. "
                    "The previous checkpoints stay as they are.", stacklevel=3)
                return
            if self._workers is not None:
                # A snapshot is a collective: the other workers, still in a
                # step, would never join it. The last periodic save resumes.
                warnings.warn(
                    f"ModelCheckpoint: {type(error).__name__} at {where}; with several workers "
                    "no checkpoint is written after an error. The previous checkpoints stay as "
                    "they are.", stacklevel=3)
                return
            metrics = self._train_metrics if self._train_metrics is not None else None
            print_msg(f"\nModelCheckpoint: {type(error).__name__} at {where}; saving the last "
                      "completed step before it propagates.")
            registry.set_cut_short(self.model, self._epoch)
            self._save(self._logs_dict(self._last_logs), steps_in_epoch=steps, force=True,
                       metrics=metrics)
        except Exception as e:  # never hide the original error
            warnings.warn(f"ModelCheckpoint: could not save after {type(error).__name__}: {e}",
                          stacklevel=3)
        finally:
            self._abandon_fit()

    @staticmethod
    def _logs_dict(logs: Any) -> dict:
        if not logs:
            return {}
        try:
            return {k: float(keras.ops.convert_to_numpy(v)) for k, v in dict(logs).items()}
        except (TypeError, ValueError):
            return {}

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
            self._abandon_fit()
            raise KeyError(
                f"ModelCheckpoint cannot fill the placeholder {e} of filepath="
                f"{self.filepath!r}; available: {', '.join(sorted(values))}."
            ) from None

    def _save(self, logs: dict, steps_in_epoch: int | None, force: bool = False,
              metrics: list[np.ndarray] | None = None) -> str | None:
        """Saves if the rules say so; returns the path written (regular or `last`), or None.

        `force` (a stop: a sibling's, a signal's, an exception's): save
        regardless of `save_best_only`, into the `last` file when the regular
        one is reserved for the best; nothing new if this very step is saved.
        `metrics`: the compiled metrics' values to store (see `capture`).
        """
        if force and self._saved_at is not None and self._saved_at[:2] == (
                registry.current_fit(self.model), self._global_step()):
            return self._saved_at[2]
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
        # One snapshot in memory at most: the previous background write ends first.
        self._wait_for_writer()
        # Synchronous: written before training goes on, so read without copies.
        # In the background: without copies only where later steps cannot
        # change what was read (TensorFlow copies on write, JAX never writes).
        snapshot = state_lib.capture(
            self.model, states, progress, rng, metrics=metrics,
            copy=self._writer is not None and not state_lib.view_is_stable())
        meta = {
            "monitor": self.monitor, "monitor_value": encode_float(value),
            "loss": encode_float(loss), "written_at": time.time(),
            "keras_version": keras.__version__, "backend": keras.backend.backend(),
        }
        written = filepath if save_regular else self._last_path()
        before = (self.last_saved_path, self.best_path, self._saved_at)
        if save_regular:
            self.last_saved_path = filepath
            if self.save_best_only:
                self.best_path = filepath
        self._saved_at = (registry.current_fit(self.model), global_step, written)
        if not self._writes:
            return written  # a worker beside the chief: the chief writes this state
        verbose = self.verbose
        # Everything that reads the model is done here, on the training
        # thread: on JAX the model's variables are detached while it trains.
        plan = self._write_plan()

        def commit() -> None:
            started = time.monotonic()
            os.makedirs(os.path.dirname(os.path.abspath(filepath)), exist_ok=True)
            if save_regular:
                self._write(filepath, snapshot, {**meta, "kind": "regular"}, plan)
                if verbose > 0:
                    print_msg(f"\n{where}: finished saving model to {filepath}")
            if write_last:
                last = self._write_last(filepath if save_regular else None, snapshot, meta, plan)
            if self._mirror is not None:
                for path in ([filepath] if save_regular else []) + ([last] if write_last else []):
                    self._mirror.push(path)
            self.last_save_seconds = time.monotonic() - started
            if self.retention:
                self._apply_retention()
                if self._mirror is not None:
                    self._mirror.prune(lambda name: bool(self._name_pattern.match(name)))

        # Keras's own writer (the fallback) reads the live variables, not the
        # snapshot: it cannot run beside training.
        if self._writer is not None and plan[2] is None:
            self._in_flight = (where, filepath)
            self._writer.submit(commit)
            return written
        try:
            commit()
        except OSError as e:
            self.last_saved_path, self.best_path, self._saved_at = before
            self._save_failed(where, filepath, e)
            return None
        return written

    def _wait_for_writer(self) -> None:
        """Waits for the background write in flight; its failure follows `on_save_error`."""
        if self._writer is None:
            return
        try:
            self._writer.wait()
        except OSError as e:
            where, filepath = self._in_flight or ("?", "?")
            self._save_failed(where, filepath, e)

    def _save_failed(self, where: str, filepath: str, error: Exception) -> None:
        message = (f"ModelCheckpoint: saving at {where} to {filepath} FAILED: "
                   f"{type(error).__name__}: {error}. The previous checkpoints are intact and "
                   "no partial file was left.")
        self.save_errors.append(message)
        if self.on_save_error == "raise":
            self._abandon_fit()
            raise error
        print_msg(f"\n{message} Training continues (on_save_error='warn').")
        warnings.warn(message, stacklevel=3)

    def _keras_writer(self) -> Callable[[str], None]:
        if self.save_weights_only:
            return lambda path: self.model.save_weights(path, overwrite=True)
        return lambda path: self.model.save(path, overwrite=True)

    def _write_plan(self) -> tuple:
        """`(layout, archive, keras_writer)` for `storage.write`, read from the model now."""
        layout, archive = None, None
        if self.save_weights_only:
            layout = self._keras_layout()
        elif self.filepath.endswith(".keras") and not keras_layout.has_assets(self.model):
            archive = keras_layout.archive_members(self.model)
            layout = self._keras_layout() if archive is not None else None
        return layout, archive, None if layout else self._keras_writer()

    def _write(self, filepath: str, snapshot: state_lib.Snapshot, meta: dict,
               plan: tuple) -> None:
        if os.path.isdir(filepath):
            raise IsADirectoryError(
                f"ModelCheckpoint: filepath {filepath!r} is a directory; give a file name.")
        if filepath not in self._written and os.path.exists(filepath):
            try:
                storage.read_meta(filepath)
            except storage.CorruptCheckpointError as e:
                warnings.warn(f"ModelCheckpoint: replacing {filepath}, which is not a valid "
                              f"keras-ckpt checkpoint ({e}).", stacklevel=3)
        layout, archive, keras_writer = plan
        storage.write(filepath, snapshot, keras_writer=keras_writer,
                      keras_layout=layout, keras_archive=archive, meta=meta, fsync=self.fsync,
                      compression=self.compression)
        self._written.add(filepath)

    def _keras_layout(self) -> keras_layout.Layout | None:
        """Keras's `.weights.h5` layout for this model (cached while the variables stay)."""
        model = self.model
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

    def _last_path(self) -> str:
        return os.path.join(self.directory, "last" + storage.extension(self.filepath))

    def _write_last(self, regular: str | None, snapshot: state_lib.Snapshot, meta: dict,
                    plan: tuple) -> str:
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
        self._write(last, snapshot, {**meta, "kind": "last"}, plan)
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
            self._abandon_fit()
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
                except OSError:
                    continue
                warnings.warn(f"ModelCheckpoint: removed {name} from {self.directory}: an "
                              "unfinished write of a process that ended mid-save (never a "
                              "checkpoint).", stacklevel=3)

    def _own_name(self, name: str) -> bool:
        """Whether `name` is one of this callback's checkpoint files (or its `last` file)."""
        return bool(self._name_pattern.match(name)) or name == os.path.basename(
            self._last_path())

    def _own_checkpoints(self) -> list[manager.CheckpointInfo]:
        return [c for c in manager.list_checkpoints(self.directory)
                if c.kind == "regular" and self._name_pattern.match(os.path.basename(c.path))]

    def _apply_retention(self) -> None:
        protect = [p for p in (self.best_path, self.last_saved_path) if p]
        deleted = manager.apply_retention(self._own_checkpoints(), self.retention, protect)
        if deleted and self.verbose > 0:
            print_msg(f"ModelCheckpoint: retention removed {len(deleted)} checkpoint(s)")

    # ------------------------------------------------------------ resume
    def _no_valid_checkpoint(self) -> None:
        files = [c for c in manager.list_checkpoints(self.directory, include_invalid=True)
                 if c.kind != "foreign"]
        if not files:
            if self.verbose > 0:
                print_msg(f"ModelCheckpoint: no checkpoint in {self.directory}; "
                          "starting from scratch.")
            return
        names = "; ".join(f"{os.path.basename(c.path)}: "
                          f"{c.error or 'its recorded loss or metric is not finite'}"
                          for c in files)
        if self.if_none_valid == "raise":
            raise storage.CorruptCheckpointError(
                f"ModelCheckpoint(resume=True): {self.directory} holds {len(files)} checkpoint "
                f"file(s), and none can be resumed from ({names}). Nothing was deleted. Move "
                "them away, or pass if_none_valid='start_fresh' to train from scratch.")
        message = (f"ModelCheckpoint: none of the {len(files)} checkpoint file(s) in "
                   f"{self.directory} can be resumed from ({names}); starting from scratch "
                   "(if_none_valid='start_fresh'). They stay on disk until a save of the same "
                   "name replaces them.")
        print_msg(message)
        warnings.warn(message, stacklevel=3)

    def _agree_on_resume(self, info: manager.CheckpointInfo | None) -> None:
        """With several workers: all must resume from the chief's checkpoint, or none."""
        if self._workers is None:
            return
        step = -1.0 if info is None else float(info.global_step)
        chosen = self._workers.from_chief(step)
        if self._workers.any(chosen != step):
            mine = "no checkpoint" if info is None else f"{info.path} (step {info.global_step})"
            chief = "no checkpoint" if chosen < 0 else f"one of global step {int(chosen)}"
            raise RuntimeError(
                f"ModelCheckpoint(resume=True): the workers would resume from different "
                f"states: this worker ({self._workers.task_type} {self._workers.task_id}) "
                f"found {mine}, the chief {chief}. Every worker must see the chief's "
                f"checkpoint directory {self.directory} (a shared file system). Nothing "
                "was changed.")

    def _resume(self) -> None:
        model = self.model
        if self.resume is True:
            found = manager.latest_checkpoint(self.directory)
            if found is None:
                self._agree_on_resume(None)
                self._no_valid_checkpoint()
                return
            info, snapshot = found
        else:
            snapshot = storage.read(self.resume)
            info = manager.info_from_meta(self.resume, snapshot.meta)
        self._agree_on_resume(info)
        state_lib.check_compatible(snapshot.meta, model)
        progress = snapshot.meta["progress"]
        epoch, step = info.resume_point
        spe = int(getattr(model, "steps_per_execution", 1) or 1)
        if step and step % spe and step != (self.params or {}).get("steps"):
            raise ValueError(
                f"The checkpoint {info.path} was written after step {step} of epoch "
                f"{epoch + 1}, which is not a multiple of this model's steps_per_execution="
                f"{spe}. Compile with the steps_per_execution the run used "
                f"({progress.get('steps_per_execution')}).")
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
            self._skipper = _skip_steps(model, -(-step // spe), snapshot)
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
    the metrics for the epoch) the compiled metrics get the interrupted epoch's
    running state back, so the epoch ends with the same logs. Afterwards it
    passes calls through (others may have wrapped it meanwhile). Keras calls
    the train function as `f(iterator)` on TensorFlow, `f(state, iterator)` on
    JAX (the state is passed in and returned) and `f(batches)` on torch (the
    batch is already fetched). Returns `(wrapper, original)`.
    """
    original = model.train_function
    backend = keras.backend.backend()
    spe = int(getattr(model, "steps_per_execution", 1) or 1)
    remaining = [calls]
    logs: dict = {}
    if backend == "jax":
        # Keras's JAX loop detaches the variables from the model while it
        # trains: the logs' names are read now, their values at epoch end.
        logs = dict(model.get_metrics_result())

    def skip(*args):
        if remaining[0] <= 0:
            return original(*args)
        first = remaining[0] == calls
        remaining[0] -= 1
        if backend == "torch":
            if first:
                state_lib.apply_metrics(snapshot, model)
            if remaining[0] == 0:  # the data order is drawn: the step's RNG state now
                state_lib.restore_rng_at_step(snapshot)
            return model.get_metrics_result()
        iterator = args[-1]
        for i in range(spe):
            try:
                batch = next(iterator)
            except StopIteration:  # the epoch's last execution can be short
                break
            if first and i == 0 and backend != "jax":
                compiled = getattr(model, "_compile_metrics", None)
                if compiled is not None and not compiled.built:
                    model._symbolic_build(data_batch=batch)
                state_lib.apply_metrics(snapshot, model)
        if backend != "jax":
            return model.get_metrics_result()
        state = args[0]
        if first:
            saved = state_lib.saved_metrics(snapshot, model)
            if saved is not None:
                state = (*state[:3], [keras.ops.convert_to_tensor(a) for a in saved])
        return logs, state

    model.train_function = skip
    return skip, original


def _calling_callback_list() -> Any:
    """A weak reference to the `CallbackList` running this `on_train_begin`, or None."""
    frame = sys._getframe(2)  # CallbackList.on_train_begin -> our on_train_begin -> here
    for _ in range(4):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, keras.callbacks.CallbackList):
            return weakref.ref(owner)
        frame = frame.f_back
    return None


class _ExitAfterTrainEnd(keras.callbacks.Callback):
    """Appended to a fit's callback list so that the exit happens after every `on_train_end`."""

    def __init__(self, status: int, callbacks: Any, release: Callable[[], None]) -> None:
        super().__init__()
        self._status, self._callbacks, self._release = status, callbacks, release

    def on_train_end(self, logs: dict | None = None) -> None:
        self._callbacks.callbacks.remove(self)
        end = getattr(self._callbacks, "_on_end", None)
        if callable(end):
            end()  # what Keras does after the last on_train_end (stops its thread pool)
        self._release()
        raise SystemExit(self._status)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
