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

import dataclasses
import random
import re
import sys
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from keras_ckpt import multi_worker
from keras_ckpt.jsonsafe import to_json_value

__all__ = ["Stateful", "Snapshot", "capture", "host_view", "view_is_stable", "object_states",
           "capture_rng", "restore_rng_at_step", "apply", "apply_metrics", "saved_metrics",
           "check_compatible", "StateMismatchError"]

GROUPS = ("model", "optimizer", "metrics")


@runtime_checkable
class Stateful(Protocol):
    """The protocol every object whose state rides in a checkpoint follows.

    `get_state()` returns a dict whose values are JSON values (numbers,
    strings, booleans, None, lists, dicts) or numpy arrays (top level only);
    `set_state(state)` takes such a dict back.
    """

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


class StateMismatchError(ValueError):
    """A checkpoint does not fit the model or optimizer it is applied to."""


@dataclasses.dataclass
class Snapshot:
    """A captured training state: `arrays` by name and JSON-safe `meta`."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


def _normalise(path: str) -> str:
    # Layer names carry per-process counters ("dense_3"); a model rebuilt in
    # the same process gets new numbers but is the same model.
    return re.sub(r"_\d+(?=[_/]|$)", "", path)


def _comparable(group: str, path: str) -> str:
    # An optimizer's variables take the scope of whoever built it (a wrapping
    # LossScaleOptimizer, a rebuild); their own names identify them.
    return _normalise(path.rsplit("/", 1)[-1] if group == "optimizer" else path)


def _variables(model: Any) -> dict[str, list]:
    optimizer = getattr(model, "optimizer", None)
    return {
        "model": list(model.variables),
        "optimizer": list(optimizer.variables) if optimizer is not None else [],
        "metrics": list(getattr(model, "metrics_variables", []) or []),
    }


def _replicas(variable: Any) -> tuple | None:
    """The per-device components of a TensorFlow distributed variable (two or more), or None."""
    components = getattr(getattr(variable, "value", None), "values", None)
    return components if isinstance(components, tuple) and len(components) > 1 else None


def _replica_arrays(variable: Any) -> list[np.ndarray] | None:
    """Each replica's value of a distributed variable, where they are not all equal.

    Under `tf.distribute.MirroredStrategy`, Keras updates BatchNormalization's
    moving statistics on each replica from its own part of the batch: the
    "mirrored" copies drift apart, and reading the variable gives replica 0's.
    An exact resume needs each one back.
    """
    components = _replicas(variable)
    if components is None:
        return None
    return _drifted([np.array(c.numpy()) for c in components])


def _drifted(values: list[np.ndarray]) -> list[np.ndarray] | None:
    """`values` (one per replica) where they differ; None where all are equal."""
    if all(np.array_equal(values[0], v) for v in values[1:]):
        return None
    return values


def _describe(variables: list) -> list[dict]:
    return [
        {"path": v.path, "shape": [int(d) for d in v.shape], "dtype": str(v.dtype)}
        for v in variables
    ]


def _rng_state() -> tuple[dict, dict[str, np.ndarray]]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
    }
    arrays = {"rng/numpy_keys": np.array(keys, dtype=np.uint32)}
    torch = _torch_if_used()
    if torch is not None:
        # Keras's torch backend shuffles arrays with torch's global generator
        # (its DataLoader's RandomSampler draws a seed from it every epoch).
        arrays["rng/torch_cpu"] = torch.get_rng_state().numpy().copy()
    return meta, arrays


def _torch_if_used() -> Any:
    """The torch module when Keras runs on torch, else None."""
    if "torch" not in sys.modules:
        return None
    import keras

    return sys.modules["torch"] if keras.backend.backend() == "torch" else None


def _rng_tuples(meta: Any, arrays: Mapping[str, np.ndarray]) -> tuple:
    """The Python, NumPy (and torch) RNG states a checkpoint holds (checked, not yet set)."""
    try:
        py = meta["python"]
        python_state = (int(py["version"]), tuple(int(v) for v in py["internal"]),
                        None if py["gauss"] is None else float(py["gauss"]))
        nps = meta["numpy"]
        keys = arrays["rng/numpy_keys"]
        numpy_state = (str(nps["kind"]), keys, int(nps["pos"]), int(nps["has_gauss"]),
                       float(nps["cached"]))
        random.Random().setstate(python_state)
        np.random.RandomState().set_state(numpy_state)
        torch_state = arrays.get("rng/torch_cpu")
        torch = _torch_if_used()
        if torch is None:
            torch_state = None
        else:
            expected = torch.get_rng_state().numel()
            for state in (torch_state, arrays.get("rng/torch_cpu_at_step")):
                if state is not None and (state.dtype != np.uint8
                                          or state.shape != (expected,)):
                    raise ValueError(f"torch RNG state of shape {state.shape}, "
                                     f"{state.dtype}; expected ({expected},), uint8")
    except (KeyError, TypeError, ValueError) as e:
        raise StateMismatchError(f"The checkpoint's RNG state is malformed ({e!r}).") from None
    return python_state, numpy_state, torch_state


def restore_rng_at_step(snapshot: Snapshot) -> None:
    """Sets the RNG state a mid-epoch snapshot holds for its step (torch's), if any."""
    state = snapshot.arrays.get("rng/torch_cpu_at_step")
    torch = _torch_if_used()
    if state is not None and torch is not None:  # checked by `apply` (`_rng_tuples`)
        torch.set_rng_state(torch.from_numpy(state.copy()))


def capture_rng() -> tuple[dict, dict[str, np.ndarray]]:
    """The global Python and NumPy RNG states, as (JSON meta, arrays)."""
    return _rng_state()


def object_states(objects: Mapping[str, Stateful]) -> dict[str, dict]:
    """`get_state()` of each object, by key."""
    return {key: dict(obj.get_state()) for key, obj in objects.items()}


def capture(model: Any, states: Mapping[str, Mapping[str, Any]] | None = None,
            progress: Mapping[str, Any] | None = None,
            rng: tuple[dict, dict[str, np.ndarray]] | None = None,
            metrics: list[np.ndarray] | None = None, copy: bool = True) -> Snapshot:
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

    Returns:
        A `Snapshot`; its variable arrays are copies, unaffected by later
        training; arrays from `states` are taken as they are.
    """
    arrays: dict[str, np.ndarray] = {}
    variables_meta: dict[str, list] = {}
    groups = _variables(model)
    for group, variables in groups.items():
        described = _describe(variables)
        for i, v in enumerate(variables):
            if group == "metrics" and metrics is not None and len(metrics) == len(variables):
                arrays[f"{group}/{i:05d}"] = metrics[i]
            else:
                view = host_view(v)
                arrays[f"{group}/{i:05d}"] = np.array(view, copy=True) if copy else view
        variables_meta[group] = described
    replicas: dict[str, int] = {}
    workers = multi_worker.workers_of(model)
    if workers is not None:  # each worker's replicas, gathered (on every worker alike)
        index = [i for i, v in enumerate(groups["model"]) if not v.trainable]
        gathered = workers.gather([groups["model"][i] for i in index])
        per_variable = zip(index, [_drifted(list(g)) for g in gathered], strict=True)
    else:
        per_variable = ((i, None if v.trainable else _replica_arrays(v))
                        for i, v in enumerate(groups["model"]))
    for i, values in per_variable:
        if values is not None:
            replicas[f"model/{i:05d}"] = len(values)
            for r, value in enumerate(values):
                arrays[f"replicas/model/{i:05d}/{r}"] = value
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
    rng_meta, rng_arrays = rng if rng is not None else _rng_state()
    arrays.update(rng_arrays)
    torch = _torch_if_used()
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
    return Snapshot(arrays=arrays, meta=meta)


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
            return read()._numpy()
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


def check_compatible(meta: Mapping[str, Any], model: Any, *, weights_only: bool = False) -> None:
    """Raises `StateMismatchError` naming the first difference between a checkpoint and `model`.

    Compares, in order, the model variables (count, then each path, shape and
    dtype; layer-name counters such as `dense_3` are ignored), the optimizer
    class, and the optimizer variables where the optimizer is built. With
    `weights_only`, only the model variables. Metadata of the wrong shape (a
    hostile or damaged file) raises `StateMismatchError` too.
    """
    _check_structure(meta)
    if not weights_only:
        saved_class = meta.get("optimizer_class")
        optimizer = getattr(model, "optimizer", None)
        current_class = type(optimizer).__name__ if optimizer is not None else None
        if saved_class != current_class:
            raise StateMismatchError(
                f"The checkpoint was written with optimizer {saved_class}, but the model is "
                f"compiled with {current_class}. Compile the model with the same optimizer "
                "to resume, or restore the weights alone (restore(..., weights_only=True))."
            )

    current = _variables(model)
    optimizer = getattr(model, "optimizer", None)
    groups = ["model"]
    if not weights_only and getattr(optimizer, "built", False):
        groups.append("optimizer")  # an unbuilt one is built by apply(), then checked
    for group in groups:
        _compare(group, meta["variables"][group], _describe(current[group]))


def _check_structure(meta: Any) -> None:
    """Checks the types of everything `apply` reads from a checkpoint's metadata."""

    def bad(what: str) -> StateMismatchError:
        return StateMismatchError(f"The checkpoint's metadata is malformed: {what}.")

    if not isinstance(meta, Mapping):
        raise bad("it is not a mapping")
    variables = meta.get("variables")
    if not isinstance(variables, Mapping):
        raise bad("no variable list")
    for group in GROUPS:
        entries = variables.get(group)
        if not isinstance(entries, list):
            raise bad(f"no list of {group} variables")
        for entry in entries:
            if not (isinstance(entry, Mapping) and isinstance(entry.get("path"), str)
                    and isinstance(entry.get("dtype"), str)
                    and isinstance(entry.get("shape"), list)
                    and all(isinstance(d, int) and d >= 0 for d in entry["shape"])):
                raise bad(f"a {group} variable entry is {entry!r}")
    objects = meta.get("objects", {})
    if not isinstance(objects, Mapping) or not all(
            isinstance(o, Mapping) and isinstance(o.get("json", {}), Mapping)
            and isinstance(o.get("arrays", []), list)
            and all(isinstance(n, str) for n in o.get("arrays", []))
            for o in objects.values()):
        raise bad("the callback states are not a mapping of states")


def _check_arrays(snapshot: Snapshot) -> None:
    """Every array the metadata refers to is present (checked before anything is assigned)."""
    meta = snapshot.meta
    needed = [f"{g}/{i:05d}" for g in GROUPS for i in range(len(meta["variables"][g]))]
    for key, saved in meta.get("objects", {}).items():
        needed += [f"objects/{key}/{n}" for n in saved.get("arrays", [])]
    replicas = meta.get("replicas", {})
    if not isinstance(replicas, dict):
        raise StateMismatchError("The checkpoint's replica table is malformed.")
    for key, count in replicas.items():
        match = re.fullmatch(r"model/(\d{5})", str(key))
        if (match is None or int(match.group(1)) >= len(meta["variables"]["model"])
                or not isinstance(count, int) or not 2 <= count <= 4096):
            raise StateMismatchError(f"The checkpoint's replica entry {key!r}: {count!r} is "
                                     "malformed.")
        needed += [f"replicas/{key}/{r}" for r in range(count)]
    missing = [n for n in needed if n not in snapshot.arrays]
    if missing:
        raise StateMismatchError(
            f"The checkpoint's metadata lists the array {missing[0]!r}, which it does not hold.")


def _compare(group: str, saved: list[dict], now: list[dict]) -> None:
    for i, (a, b) in enumerate(zip(saved, now, strict=False)):
        if (_comparable(group, a["path"]) != _comparable(group, b["path"])
                or a["shape"] != b["shape"]
                or a["dtype"] != b["dtype"]):
            raise StateMismatchError(
                f"The checkpoint does not fit this model: {group} variable {i} is "
                f"{a['path']} {tuple(a['shape'])} {a['dtype']} in the checkpoint but "
                f"{b['path']} {tuple(b['shape'])} {b['dtype']} in the model."
            )
    if len(saved) != len(now):
        longer, where = (saved, "checkpoint") if len(saved) > len(now) else (now, "model")
        extra = longer[min(len(saved), len(now))]
        raise StateMismatchError(
            f"The checkpoint does not fit this model: it has {len(saved)} {group} "
            f"variables and the model {len(now)}; the first unmatched one is "
            f"{extra['path']} {tuple(extra['shape'])} in the {where}."
        )


def _assign(variables: list, group: str, arrays: Mapping[str, np.ndarray]) -> None:
    for i, v in enumerate(variables):
        v.assign(arrays[f"{group}/{i:05d}"])


def _assign_replicas(model: Any, variables: list, replicas: Mapping[str, int],
                     arrays: Mapping[str, np.ndarray]) -> None:
    """Gives each replica of a distributed variable its own saved value back.

    Where the model now runs with another number of replicas (or none), the
    variable keeps the value `_assign` gave it (replica 0's).
    """
    workers = multi_worker.workers_of(model) if replicas else None
    ids = workers.local_replica_ids() if workers is not None else None
    for key, count in replicas.items():
        variable = variables[int(key.split("/")[1])]
        if ids is not None:  # several workers: this worker's replicas of all of them
            components = getattr(getattr(variable, "value", None), "values", None)
            if (not isinstance(components, tuple) or len(components) != len(ids)
                    or count != workers.strategy.num_replicas_in_sync):
                continue
            pairs = zip(ids, components, strict=True)
        else:
            components = _replicas(variable)
            if components is None or len(components) != count:
                continue
            pairs = enumerate(components)
        for r, component in pairs:
            value = arrays[f"replicas/{key}/{r}"]
            if tuple(value.shape) != tuple(component.shape):
                raise StateMismatchError(f"The checkpoint's replica {r} of {variable.path} has "
                                         f"shape {value.shape}; the variable {component.shape}.")
            component.assign(value)


def apply(snapshot: Snapshot, model: Any, objects: Mapping[str, Stateful] | None = None, *,
          weights_only: bool = False, metrics: bool = True, rng: bool = True) -> None:
    """Applies a `Snapshot` to `model` (and its optimizer, metrics and `objects`).

    Args:
        snapshot: what `capture` or a checkpoint read returned.
        model: a model with the same variables (checked first).
        objects: stateful objects by key; those present in the snapshot get
            their state back.
        weights_only: restore `model.variables` only.
        metrics: restore the compiled metrics' running state too.
        rng: restore the global Python and NumPy RNG states.

    Raises:
        StateMismatchError: the snapshot does not fit the model.
    """
    meta = snapshot.meta
    check_compatible(meta, model, weights_only=weights_only)
    _check_arrays(snapshot)
    rng_states = _rng_tuples(meta.get("rng"), snapshot.arrays) if rng and not weights_only \
        else None
    if weights_only:
        _assign(list(model.variables), "model", snapshot.arrays)
        return
    groups = _variables(model)
    _assign(groups["model"], "model", snapshot.arrays)
    _assign_replicas(model, groups["model"], meta.get("replicas", {}), snapshot.arrays)
    optimizer = getattr(model, "optimizer", None)
    saved_opt = meta["variables"]["optimizer"]
    if optimizer is not None and saved_opt:
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
            groups["optimizer"] = list(optimizer.variables)
            check_compatible(meta, model)
        _assign(groups["optimizer"], "optimizer", snapshot.arrays)
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
            _torch_if_used().set_rng_state(_torch_if_used().from_numpy(rng_states[2].copy()))


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
    return True
