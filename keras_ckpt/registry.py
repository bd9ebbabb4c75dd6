"""Which stateful objects ride in a model's checkpoints, and the current fit's record.

A thin facade over `keras_ckpt.fit.session`: keras-ckpt callbacks join their
model's fit when Keras hands it to them (`set_model`), so a `ModelCheckpoint`
saves the state of every keras-ckpt callback in the same `fit` with nothing
more from the user. The session of a fit lives on its model (never in a module
global) and is closed once however the fit ends.

Data helpers (see `keras_ckpt.data`) are not handed the model: the first fit
that begins after a helper was made claims it for its model.
"""

from __future__ import annotations

from typing import Any

from keras_ckpt.fit import session as _session

__all__ = ["attach", "seal", "objects_for", "current_fit", "start_at_epoch",
           "forget_start_epoch", "set_replay", "replay_until", "set_cut_short", "cut_short",
           "track_data"]

track_data = _session.track_data


def attach(model: Any, obj: Any) -> Any:
    """Registers `obj` (with `state_key`, `get_state`, `set_state`) for `model`'s fit."""
    return _session.join(model, obj)


def seal(model: Any) -> Any:
    """Marks the members attached so far as the current fit's; returns its session."""
    return _session.seal(model)


def current_fit(model: Any) -> Any:
    """The session of the fit `model` is in (or was last in), or None."""
    return _session.session_of(model)


def objects_for(model: Any) -> dict[str, Any]:
    """The stateful objects for `model` by stable key: callbacks, then data helpers."""
    session = _session.session_of(model)
    return {} if session is None else session.objects()


def start_at_epoch(model: Any, epoch: int) -> int:
    """Makes the current fit start at `epoch` or later (the largest request wins)."""
    return _session.seal(model).start_at_epoch(epoch)


def forget_start_epoch(model: Any) -> None:
    """Puts back the start epoch Keras had before `start_at_epoch`."""
    session = _session.session_of(model)
    if session is not None:
        session.release_initial_epoch()


def set_replay(model: Any, until: int) -> None:
    """Marks batch indices below `until` of the current epoch as replays (-1 ends it)."""
    session = _session.session_of(model)
    if session is not None:
        session.replay_until = until


def replay_until(model: Any) -> int:
    """Batch indices below this are replays (see `set_replay`); -1 when none."""
    session = _session.session_of(model)
    return -1 if session is None else session.replay_until


def set_cut_short(model: Any, epoch: int) -> None:
    """Marks `epoch` as ended early by a stop (its end is not a real epoch end)."""
    session = _session.session_of(model)
    if session is not None:
        session.cut_short = epoch


def cut_short(model: Any) -> int | None:
    """The epoch a stop cut short in the current fit, or None."""
    session = _session.session_of(model)
    return None if session is None else session.cut_short
