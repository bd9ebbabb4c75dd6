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
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from keras_ckpt.jsonsafe import to_json_value

__all__ = ["Stateful", "Snapshot", "capture", "object_states", "capture_rng", "apply",
           "apply_metrics", "check_compatible", "StateMismatchError"]

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
    return meta, {"rng/numpy_keys": np.array(keys, dtype=np.uint32)}


def _set_rng_state(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    py = meta["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    nps = meta["numpy"]
    np.random.set_state((nps["kind"], arrays["rng/numpy_keys"], nps["pos"],
                         nps["has_gauss"], nps["cached"]))


def capture_rng() -> tuple[dict, dict[str, np.ndarray]]:
    """The global Python and NumPy RNG states, as (JSON meta, arrays)."""
    return _rng_state()


def object_states(objects: Mapping[str, Stateful]) -> dict[str, dict]:
    """`get_state()` of each object, by key."""
    return {key: dict(obj.get_state()) for key, obj in objects.items()}


def capture(model: Any, states: Mapping[str, Mapping[str, Any]] | None = None,
            progress: Mapping[str, Any] | None = None,
            rng: tuple[dict, dict[str, np.ndarray]] | None = None) -> Snapshot:
    """Captures the full training state of `model` into host memory.

    Args:
        model: a Keras model (its optimizer and compiled metrics come along).
        objects: stateful objects by stable key (our callbacks, data helpers).
        progress: JSON-safe progress (epoch, step, history, ...).
        rng: a global RNG state from `capture_rng()`; by default, taken now.

    Returns:
        A `Snapshot`; its variable arrays are copies, unaffected by later
        training; arrays from `states` are taken as they are.
    """
    arrays: dict[str, np.ndarray] = {}
    variables_meta: dict[str, list] = {}
    for group, variables in _variables(model).items():
        described = _describe(variables)
        for i, v in enumerate(variables):
            arrays[f"{group}/{i:05d}"] = np.array(v.numpy(), copy=True)
        variables_meta[group] = described
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
    optimizer = getattr(model, "optimizer", None)
    meta = {
        "variables": variables_meta,
        "optimizer_class": type(optimizer).__name__ if optimizer is not None else None,
        "optimizer_config": _optimizer_config(optimizer),
        "objects": object_meta,
        "rng": rng_meta,
        "progress": dict(progress or {}),
    }
    return Snapshot(arrays=arrays, meta=meta)


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
    `weights_only`, only the model variables.
    """
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
    if weights_only:
        _assign(list(model.variables), "model", snapshot.arrays)
        return
    groups = _variables(model)
    _assign(groups["model"], "model", snapshot.arrays)
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
        saved = meta["objects"].get(key)
        if saved is None:
            continue
        state = dict(saved["json"])
        for name in saved["arrays"]:
            state[name] = snapshot.arrays[f"objects/{key}/{name}"]
        (obj.restore_state if hasattr(obj, "restore_state") else obj.set_state)(state)
    if rng:
        _set_rng_state(meta["rng"], snapshot.arrays)


def apply_metrics(snapshot: Snapshot, model: Any) -> bool:
    """Restores the compiled metrics' running state; False if they do not match (left as is)."""
    current = list(getattr(model, "metrics_variables", []) or [])
    saved = snapshot.meta["variables"]["metrics"]
    if len(saved) != len(current) or any(
        a["shape"] != [int(d) for d in b.shape] for a, b in zip(saved, current, strict=True)
    ):
        return False
    _assign(current, "metrics", snapshot.arrays)
    return True
