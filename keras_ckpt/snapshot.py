"""A captured training state (`Snapshot`), its protocol and the variables it covers."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Stateful", "StateMismatchError", "Snapshot", "HostBuffers", "GROUPS", "normalise",
           "comparable", "model_variables", "describe"]


class HostBuffers:
    """Host arrays that one snapshot's copies reuse from the previous snapshot's.

    A background write needs the variables copied where later steps write
    them in place (torch). Fresh arrays for every save cost a page fault per
    page (slow on VMs); these buffers are allocated at the first save and
    reused by every later one, so the fit holds one copy of the state, never
    two. The owner must not reuse them while a write of the previous snapshot
    is still in flight (ModelCheckpoint waits for it first).
    """

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def copy(self, key: str, value: np.ndarray) -> np.ndarray:
        """`value` copied into the buffer kept under `key` (made, or remade, to fit it)."""
        value = np.asarray(value)
        buffer = self._arrays.get(key)
        if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
            buffer = self._arrays[key] = np.empty(value.shape, value.dtype)
        np.copyto(buffer, value)
        return buffer

    def keep_only(self, keys: set[str]) -> None:
        """Drops the buffers of variables no longer captured."""
        for key in set(self._arrays) - keys:
            del self._arrays[key]

    def release(self) -> None:
        self._arrays.clear()

    def items(self):
        """(variable key, buffer) pairs."""
        return self._arrays.items()


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
    """A captured training state: `arrays` by name and JSON-safe `meta`.

    `arrays` is a dict, except in a checkpoint read lazily
    (`storage.read_lazily`): a mapping that reads each array when asked for.
    Variables split across JAX processes (`shards`) have no entry in `arrays`:
    a captured snapshot holds their global arrays in `split` (copied on their
    devices where the snapshot outlives the next step: Keras's step donates the
    variables' buffers); one read from a file knows its `source` path, and
    `shard_files` (a `shards.ShardFiles`, once opened) reads their pieces.
    """

    arrays: Mapping[str, np.ndarray]
    meta: dict[str, Any]
    split: dict[str, Any] | None = None
    source: str | None = None
    shard_files: Any = None


GROUPS = ("model", "optimizer", "metrics")


def normalise(path: str) -> str:
    # Layer names carry per-process counters ("dense_3"); a model rebuilt in
    # the same process gets new numbers but is the same model.
    return re.sub(r"_\d+(?=[_/]|$)", "", path)


def comparable(group: str, path: str) -> str:
    # An optimizer's variables take the scope of whoever built it (a wrapping
    # LossScaleOptimizer, a rebuild); their own names identify them.
    return normalise(path.rsplit("/", 1)[-1] if group == "optimizer" else path)


def model_variables(model: Any) -> dict[str, list]:
    optimizer = getattr(model, "optimizer", None)
    return {
        "model": list(model.variables),
        "optimizer": list(optimizer.variables) if optimizer is not None else [],
        "metrics": list(getattr(model, "metrics_variables", []) or []),
    }


def describe(variables: list) -> list[dict]:
    return [
        {"path": v.path, "shape": [int(d) for d in v.shape], "dtype": str(v.dtype)}
        for v in variables
    ]

