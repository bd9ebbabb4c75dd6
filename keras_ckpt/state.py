"""What a full training state is: capture it from a model, apply it back.

A `Snapshot` is plain data: named numpy arrays plus a JSON-safe metadata
dict. It holds every `model.variables` entry (seed-generator and BatchNorm
state included, which `save_weights` skips), every optimizer variable
(iteration count, learning rate, slots), the compiled metrics' running state
(so a mid-epoch resume ends the epoch with the same logs), the global Python
and NumPy RNG states, the state of registered stateful objects, and the
progress (epoch, step, history). This module knows nothing of files.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np

from keras_ckpt import keras_compat, multi_worker, shards, storage
from keras_ckpt.jsonsafe import to_json_value
from keras_ckpt.replicas import assign_replicas, drifted, replica_arrays
from keras_ckpt.rng import (
    AT_STEP,
    capture_rng,
    restore_rng_at_step,
    rng_state,
    rng_tuples,
    torch_if_used,
)
from keras_ckpt.rng import at_step as rng_at_step
from keras_ckpt.snapshot import (
    HostBuffers,
    Snapshot,
    Stateful,
    StateMismatchError,
    describe,
    model_variables,
)
from keras_ckpt.state_checks import check_compatible, check_snapshot

__all__ = ["Stateful", "Snapshot", "HostBuffers", "capture", "host_view", "view_is_stable",
           "object_states", "capture_rng", "restore_rng_at_step", "open_shards", "apply",
           "apply_metrics", "saved_metrics", "first_step_part", "check_compatible",
           "StateMismatchError"]


def object_states(objects: Mapping[str, Stateful]) -> dict[str, dict]:
    """`get_state()` of each object, by key."""
    return {key: dict(obj.get_state()) for key, obj in objects.items()}


def capture(model: Any, states: Mapping[str, Mapping[str, Any]] | None = None,
            progress: Mapping[str, Any] | None = None,
            rng: tuple[dict, dict[str, np.ndarray]] | None = None,
            metrics: list[np.ndarray] | None = None, copy: bool = True,
            buffers: HostBuffers | None = None) -> Snapshot:
    """Captures the full training state of `model` into host memory.

    Args:
        model: a Keras model (its optimizer and compiled metrics come along).
        states: `get_state()` of stateful objects by stable key (our
            callbacks, data helpers).
        progress: JSON-safe progress (epoch, step, history, ...).
        rng: a global RNG state from `capture_rng()`; by default, taken now.
        metrics: values to store for the compiled metrics' variables instead
            of their current ones (kept from before validation reset them).
        copy: copy every variable to host memory (the snapshot stays valid
            while training goes on). False: read without a copy where the
            backend allows it, for a caller that writes the snapshot out
            before the next training step (`host_view`).
        buffers: with `copy`, copy into these reused arrays instead of new
            ones (the previous snapshot taken with them must be written out).

    Returns:
        A `Snapshot`; its variable arrays are copies, unaffected by later
        training; arrays from `states` are taken as they are.
    """
    arrays: dict[str, np.ndarray] = {}
    variables_meta: dict[str, list] = {}
    groups = model_variables(model)
    workers = multi_worker.workers_of(model)
    split = shards.split_keys({g: groups[g] for g in ("model", "optimizer")}) \
        if isinstance(workers, multi_worker.JaxProcesses) else {}
    for group, variables in groups.items():
        described = describe(variables)
        for i, v in enumerate(variables):
            if f"{group}/{i:05d}" in split:
                continue  # its pieces, below: some process holds only part of it
            if group == "metrics" and metrics is not None and len(metrics) == len(variables):
                arrays[f"{group}/{i:05d}"] = metrics[i]
            else:
                key, view = f"{group}/{i:05d}", host_view(v)
                if copy:
                    view = buffers.copy(key, view) if buffers is not None else \
                        np.array(view, copy=True)
                arrays[key] = view
        variables_meta[group] = described
    replicas: dict[str, int] = {}
    if workers is not None and workers.per_replica_state:
        # each worker's replicas, gathered (on every worker alike)
        index = [i for i, v in enumerate(groups["model"]) if not v.trainable]
        gathered = workers.gather([groups["model"][i] for i in index])
        per_variable = zip(index, [drifted(list(g)) for g in gathered], strict=True)
    else:
        per_variable = ((i, None if v.trainable else replica_arrays(v))
                        for i, v in enumerate(groups["model"]))
    per_group = [("model", per_variable)]
    if workers is None and metrics is None:
        # Compiled metrics under MirroredStrategy accumulate per replica
        # (sync-on-read): each replica's running total comes back as it was.
        per_group.append(("metrics", ((i, replica_arrays(v))
                                      for i, v in enumerate(groups["metrics"]))))
    for group, entries in per_group:
        for i, values in entries:
            if values is not None:
                replicas[f"{group}/{i:05d}"] = len(values)
                for r, value in enumerate(values):
                    arrays[f"replicas/{group}/{i:05d}/{r}"] = value
    object_meta: dict[str, Any] = {}
    for key, state in (states or {}).items():
        json_part = {}
        for name, value in state.items():
            if isinstance(value, np.ndarray):
                # Not copied: an object hands over arrays it leaves alone
                # until the write is done (best weights stay one copy).
                arrays[f"objects/{key}/{name}"] = value
            else:
                json_part[name] = value
        object_meta[key] = {"json": json_part,
                            "arrays": sorted(n for n, v in state.items()
                                             if isinstance(v, np.ndarray))}
    rng_meta, rng_arrays = rng if rng is not None else rng_state()
    arrays.update(rng_arrays)
    if rng is not None:  # mid-epoch: the states at this step too, for after the replayed order
        step_meta, step_arrays = rng_at_step()
        rng_meta = {**rng_meta, AT_STEP: step_meta}
        arrays.update(step_arrays)
    torch = torch_if_used()
    if rng is not None and torch is not None:
        # Keras's torch Dropout (unseeded) draws from torch's global generator
        # at every step: a resume replays the epoch's data order from `rng`,
        # then takes this state, the generator's at this step.
        arrays["rng/torch_cpu_at_step"] = torch.get_rng_state().numpy().copy()
    optimizer = getattr(model, "optimizer", None)
    meta = {
        "variables": variables_meta,
        "optimizer_class": type(optimizer).__name__ if optimizer is not None else None,
        "optimizer_config": _optimizer_config(optimizer),
        "objects": object_meta,
        "rng": rng_meta,
        "progress": dict(progress or {}),
    }
    if replicas:
        meta["replicas"] = replicas
    values = None
    if split:
        table, values = shards.capture(split, copy=copy)
        meta["shards"] = {"variables": table, "files": []}  # (files: as they are written)
    if buffers is not None:
        buffers.keep_only(set(arrays))
    return Snapshot(arrays=arrays, meta=meta, split=values)


def view_is_stable() -> bool:
    """Whether `host_view` arrays keep their values while training goes on.

    TensorFlow copies a variable's buffer before writing it while a read of
    it is alive; JAX arrays are immutable. The tests check this per backend.
    """
    import keras

    return keras.backend.backend() in ("tensorflow", "jax")


def host_view(variable: Any) -> np.ndarray:
    """The variable's value as a numpy array, without a copy where the backend allows.

    On TensorFlow the array shares the buffer of the value just read; a later
    assignment to the variable writes a new buffer (copy-on-write), so the
    array keeps the value it had. On JAX it shares the variable's immutable
    array. Elsewhere (or if TensorFlow's internals change) it falls back to
    `variable.numpy()`.
    """
    inner = getattr(variable, "value", None)
    read = getattr(inner, "value", None)
    if callable(read):  # TensorFlow: the tensor just read, shared
        try:
            return keras_compat.tf_tensor_view(read())
        except (AttributeError, TypeError, ValueError):
            pass
    import keras

    if keras.backend.backend() == "jax" and inner is not None:
        return np.asarray(inner)  # an immutable array, shared (read-only)
    return np.asarray(variable.numpy())


def _optimizer_config(optimizer: Any) -> dict | None:
    """The optimizer's config as JSON (values JSON cannot hold are written as their repr)."""
    if optimizer is None:
        return None
    try:
        config = optimizer.get_config()
    except Exception:  # a custom optimizer without get_config
        return None

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        try:
            return to_json_value(value)
        except TypeError:
            return repr(value)

    return clean(config)


def _saved_order(variables: list, order: list[int] | None) -> list:
    """`variables` rearranged into the checkpoint's order (`check_compatible`'s result)."""
    if order is None:
        return variables
    arranged: list = [None] * len(variables)
    for current, saved in enumerate(order):
        arranged[saved] = variables[current]
    return arranged


def _assign(variables: list, group: str, snapshot: Snapshot) -> None:
    split = snapshot.meta.get("shards", {}).get("variables", {})
    for i, v in enumerate(variables):
        key = f"{group}/{i:05d}"
        if key not in split:
            v.assign(snapshot.arrays[key])
        else:  # split across processes: held (in memory), or read from the shard files
            v.assign(snapshot.split[key] if snapshot.split is not None
                     else snapshot.shard_files.array_for(key, v))


def open_shards(snapshot: Snapshot, model: Any, orders: Mapping[str, list[int] | None],
                state_bytes: int | None = None,
                workers: multi_worker.Workers | None = None) -> None:
    """Opens and verifies the shard files of a checkpoint with split variables (if it has
    any); with several processes, all of them or none do.

    Each process verifies the pieces it reads (those its devices hold of the
    variables, matched to the saved ones by `orders`, `check_compatible`'s
    result), so one bad piece fails on one process only: `workers` (every
    process calls this, in the same order) makes it fail on all, before any of
    them assigns anything.

    Raises:
        CorruptCheckpointError: a shard file fails here, or on another process.
    """
    if "shards" not in snapshot.meta or snapshot.split is not None:
        return
    error = None
    try:
        # Groups `check_compatible` did not match (an unbuilt optimizer, weights only)
        # are left out: their split variables are read whole.
        groups = {g: v for g, v in model_variables(model).items() if g in orders}
        shards.open_for(snapshot, {f"{g}/{i:05d}": v for g, vs in groups.items()
                                   for i, v in enumerate(_saved_order(vs, orders.get(g)))},
                        state_bytes)
    except Exception as e:  # (any: the others must not wait for this process in the collective)
        error = e  # (several processes: one error class on all, whatever happened here)
        if workers is not None and not isinstance(e, storage.CorruptCheckpointError):
            error = storage.CorruptCheckpointError(f"{snapshot.source}: {type(e).__name__}: {e}")
            error.__cause__ = e
    if workers is not None and workers.any(error is not None) and error is None:
        snapshot.shard_files.close()
        error = storage.CorruptCheckpointError(
            f"{snapshot.source}: a shard file another process reads fails verification "
            "(that process's message names it).")
    if error is not None:
        raise error


def apply(snapshot: Snapshot, model: Any, objects: Mapping[str, Stateful] | None = None, *,
          weights_only: bool = False, metrics: bool = True, rng: bool = True,
          workers: multi_worker.Workers | None = None, state_bytes: int | None = None) -> None:
    """Applies a `Snapshot` to `model` (and its optimizer, metrics and `objects`).

    Args:
        snapshot: what `capture` or a checkpoint read returned.
        model: a model with the same variables (checked first).
        objects: stateful objects by key; those present in the snapshot get
            their state back.
        weights_only: restore `model.variables` only.
        metrics: restore the compiled metrics' running state too.
        rng: restore the global Python and NumPy RNG states.
        workers: with several processes, each process's (see `open_shards`).
        state_bytes: the most a shard file may hold (the model's state bound).

    Raises:
        StateMismatchError: the snapshot does not fit the model.
        CorruptCheckpointError: a shard file fails verification (see `open_shards`).
    """
    meta = snapshot.meta
    check_snapshot(snapshot)
    optimizer = getattr(model, "optimizer", None)
    if (not weights_only and optimizer is not None and not optimizer.built
            and len(meta["variables"]["optimizer"]) > len(optimizer.variables)):
        # Built (it creates its own variables, changes nothing else) and checked
        # before anything is assigned: a mismatch leaves the model as it was. (An
        # optimizer unbuilt when written, which a custom train_step never applied,
        # stays unbuilt.)
        check_compatible(meta, model, weights_only=True)
        optimizer.build(model.trainable_variables)
    orders = check_compatible(meta, model, weights_only=weights_only)
    open_shards(snapshot, model, orders, state_bytes, workers)  # split: verified first
    rng_states = rng_tuples(meta.get("rng"), snapshot.arrays) if rng and not weights_only \
        else None
    if weights_only:
        _assign(_saved_order(list(model.variables), orders.get("model")), "model", snapshot)
        return
    groups = model_variables(model)
    variables = _saved_order(groups["model"], orders.get("model"))
    _assign(variables, "model", snapshot)
    assign_replicas(model, variables, meta.get("replicas", {}), snapshot.arrays, "model")
    if optimizer is not None and meta["variables"]["optimizer"]:
        _assign(_saved_order(groups["optimizer"], orders.get("optimizer")), "optimizer",
                snapshot)
    if metrics:
        apply_metrics(snapshot, model)
    for key, obj in (objects or {}).items():
        saved = meta.get("objects", {}).get(key)
        if saved is None:
            continue
        state = dict(saved.get("json", {}))
        for name in saved.get("arrays", []):
            state[name] = snapshot.arrays[f"objects/{key}/{name}"]
        (obj.restore_state if hasattr(obj, "restore_state") else obj.set_state)(state)
    if rng_states is not None:
        random.setstate(rng_states[0])
        np.random.set_state(rng_states[1])
        if rng_states[2] is not None:
            torch_if_used().set_rng_state(torch_if_used().from_numpy(rng_states[2].copy()))


def first_step_part(snapshot: Snapshot) -> Snapshot:
    """What a mid-epoch resume still needs after `apply`: the metrics' and the step's RNG state.

    The compiled metrics' running state (with its per-replica values) and
    the RNG states at the step; the weights and the optimizer are let go.
    """
    def kept(name: str) -> bool:
        return name.startswith(("metrics/", "replicas/metrics/", f"rng/{AT_STEP}/")) or \
            name == "rng/torch_cpu_at_step"

    meta = snapshot.meta
    at_step = (meta.get("rng") or {}).get(AT_STEP)
    return Snapshot({k: snapshot.arrays[k] for k in snapshot.arrays if kept(k)}, {
        "variables": {"metrics": meta["variables"]["metrics"]},
        "replicas": {k: c for k, c in meta.get("replicas", {}).items()
                     if k.startswith("metrics/")},
        **({"rng": {AT_STEP: at_step}} if at_step is not None else {})})


def saved_metrics(snapshot: Snapshot, model: Any) -> list[np.ndarray] | None:
    """The compiled metrics' saved running state, in `model.metrics_variables` order.

    None if the saved metrics do not match the model's.
    """
    current = list(getattr(model, "metrics_variables", []) or [])
    saved = snapshot.meta["variables"]["metrics"]
    if len(saved) != len(current) or any(
        a["shape"] != [int(d) for d in b.shape] for a, b in zip(saved, current, strict=True)
    ):
        return None
    return [snapshot.arrays[f"metrics/{i:05d}"] for i in range(len(current))]


def apply_metrics(snapshot: Snapshot, model: Any) -> bool:
    """Restores the compiled metrics' running state; False if they do not match (left as is)."""
    saved = saved_metrics(snapshot, model)
    if saved is None:
        return False
    for v, array in zip(model.metrics_variables, saved, strict=True):
        v.assign(array)
    assign_replicas(model, list(model.metrics_variables), snapshot.meta.get("replicas", {}),
                    snapshot.arrays, "metrics")
    return True

