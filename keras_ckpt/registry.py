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

__all__ = ["attach", "seal", "objects_for", "current_fit", "start_at_epoch",
           "forget_start_epoch", "set_replay", "replay_until", "set_cut_short", "cut_short",
           "track_data"]


class _Generation:
    def __init__(self) -> None:
        self.sealed = False
        self.members: list[weakref.ref] = []
        self.initial_epoch: int | None = None  # set by us for this fit
        self.replay_until = -1  # batch ends below this, in the resumed epoch, are replays
        self.cut_short: int | None = None  # an epoch a stop ended before its last step


# Models whose `_initial_epoch` we set, and in which fit: the next fit must not inherit it.
_initial_epoch_by: dict[int, tuple[weakref.ref, _Generation]] = {}


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


def seal(model: Any) -> Any:
    """Marks the set attached so far as the current fit's; forgets a start epoch set in another.

    Returns the fit's record, whose `replay_until` attribute batch hooks may
    read directly (cheaper than `replay_until(model)`, and thread-safe).
    """
    generation = _generation(model, create=True)
    generation.sealed = True
    entry = _initial_epoch_by.get(id(model))
    if entry is not None and entry[0]() is model and entry[1] is not generation:
        forget_start_epoch(model)
    return generation


def set_replay(model: Any, until: int) -> None:
    """Marks batch indices below `until` of the current epoch as replays of trained steps.

    A mid-epoch resume consumes the batches the interrupted run had trained on
    without training; Keras still calls the batch hooks for them. -1 ends it.
    """
    _generation(model, create=True).replay_until = until


def replay_until(model: Any) -> int:
    """Batch indices below this are replays (see `set_replay`); -1 when none."""
    generation = _generation(model, create=False)
    return -1 if generation is None else generation.replay_until


def set_cut_short(model: Any, epoch: int) -> None:
    """Marks `epoch` as ended early by a stop (its end is not a real epoch end)."""
    _generation(model, create=True).cut_short = epoch


def cut_short(model: Any) -> int | None:
    """The epoch a stop cut short in the current fit, or None."""
    generation = _generation(model, create=False)
    return None if generation is None else generation.cut_short


def start_at_epoch(model: Any, epoch: int) -> int:
    """Makes the current fit start at `epoch` or later (the largest request wins).

    Keras's `fit` reads `model._initial_epoch` after `on_train_begin`; several
    keras-ckpt callbacks may ask (a resume, a spent budget), in any order.
    Returns the epoch the fit will start at.
    """
    generation = _generation(model, create=True)
    if generation.initial_epoch is not None:
        epoch = max(epoch, generation.initial_epoch)
    generation.initial_epoch = epoch
    model._initial_epoch = epoch
    _initial_epoch_by[id(model)] = (weakref.ref(model), generation)
    return epoch


def forget_start_epoch(model: Any) -> None:
    """Undoes `start_at_epoch`, so that the next fit starts where its caller says."""
    entry = _initial_epoch_by.pop(id(model), None)
    if entry is not None and entry[0]() is model:
        model._initial_epoch = None
        entry[1].initial_epoch = None


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
