"""Where Keras's `.weights.h5` puts each variable, so that keras-ckpt can write that file itself.

`model.save_weights` walks the model (layers, then the optimizer) and lets
each object store its variables as `<path>/vars/<i>` datasets. `layout(model)`
runs the same walk (Keras's own `_save_state`) against a store that records
instead of writing: which group, which attributes, which key, and which
variable (or, for the rare layer that stores a computed array, that array).
keras-ckpt then writes Keras's layout from its snapshot, in the same pass as
its own state, sharing each variable's dataset between the two (HDF5 hard
links): one copy of the data on disk, one pass to write it, and a file that
`model.load_weights` reads as if Keras had written it (with the attributes
Keras puts on some dtypes' datasets, see `dtypes.keras_attrs`).

Relies on a private Keras function; `layout` returns None when it is not
there or the walk does something unexpected, and the caller falls back to
letting Keras write its part.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from keras_ckpt import dtypes, keras_compat

__all__ = ["Entry", "Layout", "layout", "archive_members", "has_assets"]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One dataset of Keras's layout: `group`/`key`, from a snapshot array or a value."""

    group: str
    key: str
    array: str | None  # the snapshot's array name ("model/00003"), or None
    value: np.ndarray | None = None  # a computed array, when not a variable


@dataclasses.dataclass(frozen=True)
class Layout:
    """Groups to create (with their attributes) in order, and the datasets."""

    groups: list[tuple[str, dict]]
    entries: list[Entry]


def layout(model: Any, names: dict[int, str]) -> Layout | None:
    """Keras's `.weights.h5` layout for `model`, or None if it cannot be recorded.

    Args:
        model: a built model.
        names: `id(variable)` to the snapshot array name holding its value.
    """
    try:
        base, save_state, _ = keras_compat.saving_internals()
    except ImportError:  # pragma: no cover - a Keras without it
        return None
    if base is None or save_state is None:  # pragma: no cover
        return None

    class Recorder(base):  # passes Keras's isinstance check; writes nothing
        def __init__(self) -> None:  # no file
            self.groups: list[tuple[str, dict]] = []
            self.entries: list[Entry] = []
            self.created: set[str] = set()
            self.path = ""

        def __bool__(self) -> bool:
            return True

        def make(self, path, metadata=None):
            self.path = path
            if metadata:
                self._group(path, dict(metadata))
            return self

        def _group(self, path: str, attrs: dict) -> str:
            group = f"{path}/vars" if path else "vars"
            if group not in self.created:
                self.created.add(group)
                self.groups.append((group, attrs))
            return group

        def __setitem__(self, key, value):
            group = self._group(self.path, {})
            name = names.get(id(value))
            if name is not None:
                self.entries.append(Entry(group, str(key), name))
            else:
                array = np.array(value, copy=True)
                if not dtypes.allowed(array.dtype):
                    raise TypeError(f"unsupported dtype {array.dtype}")
                self.entries.append(Entry(group, str(key), None, array))

        def close(self) -> None:
            pass

    recorder = Recorder()
    # The optimizer would store a `.numpy()` copy of every slot: the variables instead.
    restore = keras_compat.store_optimizer_uncopied(getattr(model, "optimizer", None))
    try:
        save_state(model, weights_store=recorder, assets_store=None, inner_path="",
                   visited_saveables=set())
    except Exception:  # noqa: BLE001 - any surprise: let Keras write its part
        return None
    finally:
        restore()
    return Layout(groups=recorder.groups,
                  entries=_map_optimizer(model, recorder.groups, recorder.entries, names))


def _map_optimizer(model: Any, groups: list[tuple[str, dict]], entries: list[Entry],
                   names: dict[int, str]) -> list[Entry]:
    """Maps the optimizer's stored copies back to its variables.

    An optimizer class of its own stores what it likes; where it stores
    `variable.numpy()` copies, key `i` for `optimizer.variables[i]` (as
    Keras's does), each is checked (shape, dtype, value) before it is trusted,
    so later saves can write from the snapshot without copies. (Keras's own
    optimizers store the variables themselves here: `store_optimizer_uncopied`.)
    """
    optimizer = getattr(model, "optimizer", None)
    variables = list(getattr(optimizer, "variables", []) or [])
    name = getattr(optimizer, "name", None)
    owned = {g for g, attrs in groups if attrs.get("name") == name and g.endswith("optimizer/vars")}
    mapped = []
    for entry in entries:
        if entry.value is not None and entry.group in owned and entry.key.isdigit():
            i = int(entry.key)
            if i < len(variables) and id(variables[i]) in names:
                current = np.asarray(variables[i].numpy())
                if (current.shape == entry.value.shape and current.dtype == entry.value.dtype
                        and np.array_equal(current, entry.value, equal_nan=True)):
                    entry = Entry(entry.group, entry.key, names[id(variables[i])])
        mapped.append(entry)
    return mapped


def archive_members(model: Any) -> tuple[str, str] | None:
    """The `config.json` and `metadata.json` texts Keras puts in a `.keras` archive, or None."""
    try:
        return keras_compat.saving_internals()[2](model)
    except Exception:  # noqa: BLE001 - a Keras without it, or a model it cannot serialize
        return None


def has_assets(model: Any) -> bool:
    """Whether a layer of `model` saves assets (files) into a `.keras` archive."""
    layers = keras_compat.flatten_layers(model)
    return any(callable(getattr(layer, "save_assets", None)) for layer in layers)
