"""Whether a checkpoint fits a model: checked before anything is assigned."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from keras_ckpt import dtypes
from keras_ckpt.shards import check_table
from keras_ckpt.snapshot import (
    GROUPS,
    Snapshot,
    StateMismatchError,
    comparable,
    describe,
    model_variables,
)

__all__ = ["check_compatible", "check_arrays", "check_snapshot", "saved_order",
           "state_bytes_bound", "check_progress"]


def check_compatible(meta: Mapping[str, Any], model: Any, *,
                     weights_only: bool = False) -> dict[str, list[int] | None]:
    """Raises `StateMismatchError` naming the first difference between a checkpoint and `model`.

    Compares, in order, the model variables (count, then each path, shape and
    dtype; layer-name counters such as `dense_3` are ignored), the optimizer
    class, and the optimizer variables where the optimizer is built. With
    `weights_only`, only the model variables. Metadata of the wrong shape (a
    hostile or damaged file) raises `StateMismatchError` too.

    A model that lists the same variables in another order (a subclassed
    model built lazily by `fit`) fits: the result gives, per group, the saved
    index of each current variable (None where the order is the same).
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

    current = model_variables(model)
    optimizer = getattr(model, "optimizer", None)
    groups = ["model"]
    if not weights_only and (getattr(optimizer, "built", False) or optimizer is not None and len(
            meta["variables"]["optimizer"]) == len(getattr(optimizer, "variables", None) or [])):
        # An unbuilt one is built by apply(), then checked, unless it was unbuilt when written
        # (a custom train_step applies optimizers of its own: Keras's GAN example).
        groups.append("optimizer")
    orders: dict[str, list[int] | None] = {}
    for group in groups:
        saved, now = meta["variables"][group], describe(current[group])
        orders[group] = saved_order(group, saved, now)
        if orders[group] is None:
            _compare(group, saved, now)
    return orders


def _key(group: str, entry: Mapping[str, Any]) -> tuple:
    return comparable(group, entry["path"]), tuple(entry["shape"]), entry["dtype"]


def saved_order(group: str, saved: list[dict], now: list[dict]) -> list[int] | None:
    """The saved index of each current variable, where the same variables come in another order.

    None when the order is the same, or when the variables differ (then
    `_compare` names the difference). Variables of the same name (after the
    layer-name counters are ignored) keep their relative order.
    """
    keys_saved, keys_now = [_key(group, e) for e in saved], [_key(group, e) for e in now]
    if keys_saved == keys_now or sorted(keys_saved) != sorted(keys_now):
        return None
    pending: dict[tuple, list[int]] = {}
    for j, key in enumerate(keys_saved):
        pending.setdefault(key, []).append(j)
    return [pending[key].pop(0) for key in keys_now]


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


def check_arrays(snapshot: Snapshot) -> None:
    """Every array the metadata refers to is present (checked before anything is assigned)."""
    meta = snapshot.meta
    split = check_table(meta)  # variables split across processes: in their shard files
    needed = [f"{g}/{i:05d}" for g in GROUPS for i in range(len(meta["variables"][g]))
              if f"{g}/{i:05d}" not in split]
    for key, saved in meta.get("objects", {}).items():
        needed += [f"objects/{key}/{n}" for n in saved.get("arrays", [])]
    replicas = meta.get("replicas", {})
    if not isinstance(replicas, dict):
        raise StateMismatchError("The checkpoint's replica table is malformed.")
    for key, count in replicas.items():
        match = re.fullmatch(r"(model|metrics)/(\d{5})", str(key))
        if (match is None or int(match.group(2)) >= len(meta["variables"][match.group(1)])
                or not isinstance(count, int) or not 2 <= count <= 4096):
            raise StateMismatchError(f"The checkpoint's replica entry {key!r}: {count!r} is "
                                     "malformed.")
        needed += [f"replicas/{key}/{r}" for r in range(count)]
    missing = [n for n in needed if n not in snapshot.arrays]
    if missing:
        raise StateMismatchError(
            f"The checkpoint's metadata lists the array {missing[0]!r}, which it does not hold.")


def _nbytes(variables: list) -> int:
    total = 0
    for v in variables:
        try:
            itemsize = dtypes.declared(str(v.dtype)).itemsize  # ml_dtypes' floats too
        except (TypeError, ValueError):
            itemsize = 8
        total += int(np.prod([int(d) for d in v.shape], dtype=np.int64)) * itemsize
    return total


def state_bytes_bound(model: Any) -> int | None:
    """The most a checkpoint of `model` can hold in arrays: twice its state, or None.

    Its state is the model's, optimizer's and metrics' variables (an optimizer
    not built yet counted as four slots per trainable variable), times the
    replicas of a distributed model; twice that leaves room for the callbacks'
    arrays (EarlyStopping's best weights) and the RNG states. None when the
    model has no variables yet (built lazily from the checkpoint).
    """
    if not getattr(model, "variables", None):
        return None
    groups = model_variables(model)
    optimizer = getattr(model, "optimizer", None)
    optimizer_bytes = _nbytes(groups["optimizer"]) if getattr(optimizer, "built", False) else \
        4 * _nbytes(list(getattr(model, "trainable_variables", []))) + 4096
    strategy = getattr(model, "distribute_strategy", None)
    replicas = max(1, int(getattr(strategy, "num_replicas_in_sync", 1) or 1))
    state = _nbytes(groups["model"]) + optimizer_bytes + _nbytes(groups["metrics"])
    return 2 * replicas * state + (1 << 20)


def check_progress(progress: Any) -> None:
    """The run's progress and history as resume reads them."""
    history = progress.get("history", {}) if isinstance(progress, Mapping) else None
    values = history.get("values", {}) if isinstance(history, Mapping) else None
    if not (isinstance(values, Mapping) and all(
            isinstance(k, str) and isinstance(v, list) for k, v in values.items())
            and isinstance(history.get("epoch", []), list)):
        raise StateMismatchError(
            f"The checkpoint's metadata is malformed: its progress is {progress!r:.200}.")


def check_snapshot(snapshot: Snapshot) -> None:
    """A snapshot read from a file is well-formed: checked before it is used at all.

    Its metadata has the structure `apply` reads, every array it lists is
    there, and each variable's array has exactly the shape and dtype the
    variable's entry declares (no silent cast, no partial assignment later).

    Raises:
        StateMismatchError: naming the first thing malformed.
    """
    meta = snapshot.meta
    _check_structure(meta)
    check_progress(meta.get("progress", {}))
    check_arrays(snapshot)
    spec = getattr(snapshot.arrays, "spec", None)  # arrays read when asked for: no read here
    split = check_table(meta)
    for group in GROUPS:
        for i, entry in enumerate(meta["variables"][group]):
            name = f"{group}/{i:05d}"
            if name in split:
                continue  # (its pieces were checked against this entry)
            if spec is not None:
                shape, dtype = spec(name)
            else:
                array = snapshot.arrays[name]
                shape, dtype = list(getattr(array, "shape", ())), getattr(array, "dtype", None)
            if shape != entry["shape"] or getattr(dtype, "name", None) != entry["dtype"]:
                raise StateMismatchError(
                    f"The checkpoint's array for {group} variable {entry['path']} is "
                    f"{tuple(shape)} {dtype}, but its entry declares "
                    f"{tuple(entry['shape'])} {entry['dtype']}.")


def _compare(group: str, saved: list[dict], now: list[dict]) -> None:
    for i, (a, b) in enumerate(zip(saved, now, strict=False)):
        if (comparable(group, a["path"]) != comparable(group, b["path"])
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

