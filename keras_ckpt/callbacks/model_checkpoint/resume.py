"""Resume: choose a checkpoint, agree on it across workers, check it, apply it, replay.

At train begin (`resume(owner)`): the newest valid checkpoint of the
directory (or the file `resume=` names) is read and verified, every worker
must have found the chief's, the model must match it, and the state goes into
the model, the optimizer and every stateful object of the fit. Keras's `fit`
is told where to start; a checkpoint written mid-epoch makes the resumed
epoch begin at its next batch, with the same data in the same order: the
epoch iterator skips the trained batches (`keras_compat.start_epoch_at`;
without the step or any callback), or, where no epoch iterator is found, the
first calls of the step function consume them without training (`Replay`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import keras

from keras_ckpt import inputs, keras_compat, manager, registry, storage
from keras_ckpt import rng as rng_lib
from keras_ckpt import state as state_lib
from keras_ckpt.fit import keras_callbacks
from keras_ckpt.jsonsafe import decode_log
from keras_ckpt.keras_compat import print_msg
from keras_ckpt.state_checks import state_bytes_bound
from keras_ckpt.warn import warn

__all__ = ["resume", "Replay", "restore_history_epochs"]


def _no_valid_checkpoint(owner: Any) -> None:
    directory = owner.files
    files = [c for c in directory.resumable() if c.kind != "foreign"]
    if not files:
        if owner.options.verbose > 0:
            print_msg(f"ModelCheckpoint: no checkpoint in {directory.path}; "
                      "starting from scratch.")
        return
    names = "; ".join(f"{os.path.basename(c.path)}: " + (
        c.error or ("its recorded loss or metric is not finite" if not c.finite
                    else "it fails verification (the warnings above say why)"))
        for c in files)
    if owner.options.if_none_valid == "raise":
        raise storage.CorruptCheckpointError(
            f"ModelCheckpoint(resume=True): {directory.path} holds {len(files)} checkpoint "
            f"file(s), and none can be resumed from ({names}). Nothing was deleted. Move "
            "them away, or pass if_none_valid='start_fresh' to train from scratch.")
    message = (f"ModelCheckpoint: none of the {len(files)} checkpoint file(s) in "
               f"{directory.path} can be resumed from ({names}); starting from scratch "
               "(if_none_valid='start_fresh'). They stay on disk until a save of the same "
               "name replaces them.")
    print_msg(message)
    warn(message)


def _agree(owner: Any, info: manager.CheckpointInfo | None) -> None:
    """With several workers: all must resume from the chief's checkpoint, or none."""
    workers = owner.workers
    if workers is None:
        return
    step = -1.0 if info is None else float(info.global_step)
    chosen = workers.from_chief(step)
    if workers.any(chosen != step):
        mine = "no checkpoint" if info is None else f"{info.path} (step {info.global_step})"
        chief = "no checkpoint" if chosen < 0 else f"one of global step {int(chosen)}"
        raise RuntimeError(
            f"ModelCheckpoint(resume=True): the workers would resume from different "
            f"states: this worker ({workers.task_type} {workers.task_id}) "
            f"found {mine}, the chief {chief}. Every worker must see the chief's "
            f"checkpoint directory {owner.files.path} (a shared file system). Nothing "
            "was changed.")


def _first_rows(x: Any) -> Any:
    """One sample of a fit's `x` (arrays, dicts or lists of them, a PyDataset), or None."""
    if isinstance(x, keras.utils.PyDataset):
        batch = x[0]
        return batch[0] if isinstance(batch, tuple) else batch
    if isinstance(x, dict):
        rows = {k: _first_rows(v) for k, v in x.items()}
        return None if any(v is None for v in rows.values()) else rows
    if isinstance(x, (list, tuple)):
        rows = [_first_rows(v) for v in x]
        return None if any(v is None for v in rows) else type(x)(rows)
    if hasattr(x, "shape") and hasattr(x, "__getitem__") and len(getattr(x, "shape", ())) > 0:
        return x[:1]
    return None


def _build_lazily(model: Any, snapshot: state_lib.Snapshot) -> None:
    """Builds a model Keras builds only at its first step (a subclassed one) from one sample.

    Calling it on one row of `fit`'s input creates its variables (inference:
    no RNG drawn, no statistics updated), so the checkpoint can go into them.
    """
    if len(model.variables) >= len(snapshot.meta["variables"]["model"]):
        return
    sample = _first_rows((keras_compat.fit_arguments(model) or {}).get("x"))
    if sample is not None:
        model(sample, training=False)


_CHANGED = {"steps_per_epoch": "batch_size, steps_per_epoch or the training data changed",
            "gradient_accumulation_steps": "the optimizer's gradient_accumulation_steps changed"}


def _check_fit_arguments(owner: Any, info: Any, progress: dict, step: int) -> None:
    """What a step means must match the checkpoint's: an error mid-epoch, a warning at an end."""
    optimizer = getattr(owner.model, "optimizer", None)
    now = {"steps_per_epoch": (owner.params or {}).get("steps"),
           "gradient_accumulation_steps": getattr(optimizer, "gradient_accumulation_steps",
                                                  None)}
    for name, value in now.items():
        saved = progress.get(name)
        if saved is None or value is None or int(saved) == int(value):
            continue
        message = (f"ModelCheckpoint: the checkpoint {info.path} was written with {name}="
                   f"{saved}, this fit has {name}={value} ({_CHANGED[name]}).")
        if step:
            raise ValueError(
                f"{message} Resuming in the middle of an epoch would skip other batches than "
                "the interrupted run trained. Run with the arguments of the interrupted run, "
                "or resume from a checkpoint written at an epoch end.")

        warn(f"{message} Training continues from the end of epoch {info.epoch + 1}; "
             "the run will differ from an uninterrupted one.")


def resume(owner: Any) -> None:
    """Restores the newest valid checkpoint into `owner`'s model and fit (at train begin).

    The checkpoint is verified whole before anything is assigned; its arrays
    are then read one at a time as they are assigned (its file open until here).
    """
    with contextlib.ExitStack() as lazy:
        _resume(owner, lazy)


def _resume(owner: Any, lazy: contextlib.ExitStack) -> None:
    model, fit = owner.model, owner.fit
    bound = state_bytes_bound(model)  # nothing bigger than the model's state is read

    def fits(snapshot: state_lib.Snapshot) -> None:
        _build_lazily(model, snapshot)
        orders = state_lib.check_compatible(snapshot.meta, model)
        if "shards" in snapshot.meta:  # verified here, read as assigned
            state_lib.open_shards(snapshot, model, orders, bound, owner.workers)
            lazy.callback(snapshot.shard_files.close)

    own = owner.files.latest(bound, fits, lazy) if owner.options.resume is not True else None
    if owner.options.resume is True:
        found = owner.files.latest(bound, fits, lazy)
        if found is None:
            _agree(owner, None)
            _no_valid_checkpoint(owner)
            return
        info, snapshot = found
    elif own is not None:
        # `resume=<file>` starts a run; once the run has checkpoints of its
        # own, a restart continues from the newest of them.
        info, snapshot = own
        print_msg(f"ModelCheckpoint: {owner.files.path} already holds this run's "
                  f"checkpoints; continuing from {info.path}, not from {owner.options.resume}.")
    else:
        snapshot = lazy.enter_context(
            manager.read_verified_lazily(owner.options.resume, state_bytes=bound))
        info = manager.info_from_meta(owner.options.resume, snapshot.meta)
        fits(snapshot)  # (the directory's checkpoints were checked as they were chosen)
    _agree(owner, info)
    progress = snapshot.meta["progress"]
    epoch, step = info.resume_point
    spe = int(getattr(model, "steps_per_execution", 1) or 1)
    if step and step % spe and step != (owner.params or {}).get("steps"):
        raise ValueError(
            f"The checkpoint {info.path} was written after step {step} of epoch "
            f"{epoch + 1}, which is not a multiple of this model's steps_per_execution="
            f"{spe}. Compile with the steps_per_execution the run used "
            f"({progress.get('steps_per_execution')}).")
    _check_fit_arguments(owner, info, progress, step)
    if snapshot.meta.get(rng_lib.DIFFER_KEY):
        warn(f"ModelCheckpoint: resuming from {info.path}: " + rng_lib.differ_message(True))
    objects = registry.objects_for(model)
    state_lib.apply(snapshot, model, objects, metrics=False)
    owner.resumed_from = info
    finished = [obj.finished() for obj in objects.values()  # ours, and Keras's EarlyStopping
                if callable(getattr(obj, "finished", None)) and obj.finished()]
    epochs = (owner.params or {}).get("epochs")
    if finished and epochs is not None:
        print_msg(f"ModelCheckpoint: resumed from {info.path}. " + " ".join(finished))
        step = 0
        epoch = max(epoch, epochs)
    saved = progress.get("history", {})
    history = keras.callbacks.History
    keras_history = getattr(model, "history", None)
    if isinstance(keras_history, history):
        keras_history.history.clear()
        for k, v in saved.get("values", {}).items():
            keras_history.history[k] = [decode_log(x) for x in v]
        fit.pending_epochs = list(saved.get("epoch", []))
    session = registry.current_fit(model)
    if step:
        session.resumed_mid_epoch = epoch  # a LearningRateScheduler already set its rate
        fit.resume_step = step
        _skip_trained(owner, step, spe, snapshot)
    session.start_at_epoch(epoch)
    session.resume_point = (epoch, step)
    for problem in keras_callbacks.rows_after(session, epoch):
        warn(f"ModelCheckpoint: {problem}")
    if not finished:
        inputs.fast_forward(model, epoch)  # a seeded .shuffle(...) draws epoch `epoch`'s order next
    fit.last_save_step = info.global_step
    if not finished:  # one line, also at verbose=0 (Keras's printing: its logging switch)
        steps = (owner.params or {}).get("steps")
        at = f", step {step + 1}" if steps is None or step < steps else " after its last step"
        where = f"epoch {epoch + 1}" + (at if step else "")
        replayed = f" ({step} trained batch{'es' if step > 1 else ''} skipped)" if step else ""
        print_msg(f"ModelCheckpoint: resumed from {info.path}; continuing at {where}{replayed}.")
    if epochs is not None and epoch >= epochs and not finished:
        print_msg(f"ModelCheckpoint: the checkpoint already completed all {epochs} "
                  "epochs; nothing left to train.")


def restore_history_epochs(model: Any, fit: Any) -> None:
    """Puts the resumed epochs back into Keras's `History` (it resets them at train begin)."""
    history = getattr(model, "history", None)
    if fit.pending_epochs is not None and isinstance(history, keras.callbacks.History):
        history.epoch[:0] = fit.pending_epochs
        fit.pending_epochs = None


def _skip_trained(owner: Any, step: int, spe: int, snapshot: state_lib.Snapshot) -> None:
    """The resumed epoch begins after its `step` trained batches.

    The epoch iterator skips them (`keras_compat.start_epoch_at`). Where the
    epoch may have no new step (the checkpoint holds its last one, or its
    length is unknown), the last trained call goes through the step function
    as a `Replay` instead: Keras takes an epoch's training logs from its last
    call. Without an epoch iterator, every trained call does.
    """
    model, session = owner.model, owner.fit_session
    snapshot = state_lib.first_step_part(snapshot)  # nothing else outlives `apply`
    calls, steps = -(-step // spe), (owner.params or {}).get("steps")
    tail = 1 if steps is None or step >= steps else 0
    skipped = _first_new_step(model, snapshot) if not tail else lambda batch, drew: None
    if calls > tail and keras_compat.start_epoch_at(
            model, (calls - tail) * spe, skipped,
            lambda e: session.guards.step_failed("train_function", e)) is None:
        tail = calls  # no epoch iterator found
    if tail:
        session.replay_until = step
        session.guards.replay = Replay(model, tail, snapshot)


def _first_new_step(model: Any, snapshot: state_lib.Snapshot) -> Any:
    """What a resumed epoch needs once its trained batches are skipped (`start_epoch_at`).

    The compiled metrics get the interrupted epoch's running state back (Keras
    reset them at epoch begin; on TensorFlow they are built from the last
    skipped batch first), and the global RNGs their states at the step (the
    data order is drawn by now; Python's and NumPy's stay where reading the
    skipped batches again left them, where the input draws). The snapshot is
    let go then.
    """
    held = [snapshot]

    def skipped(batch: Any, drew: bool = False) -> None:
        restored = held.pop()
        backend = keras.backend.backend()
        if backend == "tensorflow" and batch is not None:
            compiled = keras_compat.compiled_metrics(model)
            if compiled is not None and not compiled.built:
                keras_compat.symbolic_build(model, batch)
        state_lib.apply_metrics(restored, model)
        # The order is drawn: the RNG states at the step now (Python's and NumPy's stay
        # where reading the skipped batches again left them, where the input draws from them).
        state_lib.restore_rng_at_step(restored, python_and_numpy=not drew)
        if drew:
            print_msg("ModelCheckpoint: the input draws random numbers as it reads its "
                      "batches (random augmentation): the trained batches of the resumed "
                      "epoch were read again, not trained, for the same draws.")

    return skipped


class Replay:
    """The first `calls` train-function calls consume their batches without training.

    The resumed epoch then sees exactly the batches the interrupted run had not
    trained on yet, in the same order. At the first call (after Keras has reset
    the metrics for the epoch) the compiled metrics get the interrupted epoch's
    running state back, so the epoch ends with the same logs; the logs are
    computed once (nothing changes them while batches are skipped). The
    snapshot is let go at the last skipped call. Keras calls the train function as
    `f(iterator)` on TensorFlow, `f(state, iterator)` on JAX (the state is
    passed in and returned) and `f(batches)` on torch (already fetched).
    """

    def __init__(self, model: Any, calls: int, snapshot: state_lib.Snapshot) -> None:
        self.model = model
        self.calls = calls
        self.remaining = calls
        self.snapshot: state_lib.Snapshot | None = snapshot
        self.backend = keras.backend.backend()
        self.spe = int(getattr(model, "steps_per_execution", 1) or 1)
        # Keras's JAX loop detaches the variables from the model while it
        # trains: the logs' names are read now, their values at epoch end.
        self.logs = dict(model.get_metrics_result()) if self.backend == "jax" else {}
        self.skipped_logs: dict = {}

    def __call__(self, original: Any, *args: Any) -> Any:
        if self.remaining <= 0:
            return original(*args)
        model, snapshot = self.model, self.snapshot
        first = self.remaining == self.calls
        self.remaining -= 1
        if self.remaining == 0:
            self.snapshot = None  # nothing of the restored state outlives the replay
        if self.backend == "torch":
            if first:
                state_lib.apply_metrics(snapshot, model)
            if self.remaining == 0:  # the data order is drawn: the step's RNG states now
                state_lib.restore_rng_at_step(snapshot)
            return self._logs(first)
        iterator = args[-1]
        for i in range(self.spe):
            try:
                batch = next(iterator)
            except StopIteration:  # the epoch's last execution can be short
                break
            if first and i == 0 and self.backend != "jax":
                compiled = keras_compat.compiled_metrics(model)
                if compiled is not None and not compiled.built:
                    keras_compat.symbolic_build(model, batch)
                state_lib.apply_metrics(snapshot, model)
        if self.remaining == 0:  # its batches read: the step's RNG states now
            state_lib.restore_rng_at_step(snapshot)
        if self.backend != "jax":
            return self._logs(first)
        state = args[0]
        if first:
            saved = state_lib.saved_metrics(snapshot, model)
            if saved is not None:
                state = (*state[:3], [keras.ops.convert_to_tensor(a) for a in saved])
        return self.logs, state

    def _logs(self, first: bool) -> dict:
        """The metrics' results, computed at the first skipped call (they stay as they are)."""
        if first:
            self.skipped_logs = dict(self.model.get_metrics_result())
        return dict(self.skipped_logs)
