"""Which stateful objects ride in a model's checkpoints.

keras-ckpt callbacks attach themselves to their model when Keras hands it to
them (`set_model`), so a `ModelCheckpoint` saves the state of every keras-ckpt
callback in the same `fit` with nothing more from the user. Keras calls
`set_model` on all of a fit's callbacks before any `on_train_begin`; the first
`on_train_begin` seals that set, and the next `set_model` after it starts a
new one, so callbacks of an earlier fit on the same model drop out.

Data helpers (see `keras_ckpt.data`) are not handed the model; they are
tracked by name, process-wide, newest first.
"""

from __future__ import annotations

import weakref
from typing import Any

__all__ = ["attach", "seal", "objects_for", "current_fit", "track_data", "untrack_data"]


class _Generation:
    def __init__(self) -> None:
        self.sealed = False
        self.members: list[weakref.ref] = []


_by_model: dict[int, tuple[weakref.ref, _Generation]] = {}
_data: dict[str, weakref.ref] = {}


def _generation(model: Any, create: bool) -> _Generation | None:
    entry = _by_model.get(id(model))
    if entry is not None and entry[0]() is model:
        return entry[1]
    if not create:
        return None
    generation = _Generation()
    key = id(model)
    _by_model[key] = (weakref.ref(model, lambda _ref, key=key: _by_model.pop(key, None)),
                      generation)
    return generation


def attach(model: Any, obj: Any) -> None:
    """Registers `obj` (with `state_key`, `get_state`, `set_state`) for `model`'s checkpoints."""
    generation = _generation(model, create=True)
    if generation.sealed:
        generation = _Generation()
        _by_model[id(model)] = (_by_model[id(model)][0], generation)
    if not any(ref() is obj for ref in generation.members):
        generation.members.append(weakref.ref(obj))


def seal(model: Any) -> None:
    """Marks the set attached so far as the current fit's."""
    generation = _generation(model, create=False)
    if generation is not None:
        generation.sealed = True


def current_fit(model: Any) -> object | None:
    """A token for the fit `model` is in (the sealed set of its callbacks), or None."""
    return _generation(model, create=False)


def objects_for(model: Any) -> dict[str, Any]:
    """The stateful objects for `model` by stable key: callbacks, then data helpers.

    A callback's key is its `state_key`; a second one with the same key in the
    same fit gets `_1`, a third `_2`, in the order the callbacks were passed.
    """
    result: dict[str, Any] = {}
    generation = _generation(model, create=False)
    for ref in generation.members if generation is not None else []:
        obj = ref()
        if obj is None:
            continue
        key, n = obj.state_key, 0
        while key in result:
            n += 1
            key = f"{obj.state_key}_{n}"
        result[key] = obj
    for name, ref in list(_data.items()):
        obj = ref()
        if obj is None:
            _data.pop(name, None)
        else:
            result[f"data:{name}"] = obj
    return result


def track_data(name: str, obj: Any) -> None:
    """Tracks a data helper under `name`; a newer helper of the same name replaces it."""
    _data[name] = weakref.ref(obj)


def untrack_data(name: str, obj: Any) -> None:
    """Stops tracking `obj` under `name` (if it is the one tracked)."""
    ref = _data.get(name)
    if ref is not None and ref() is obj:
        del _data[name]
