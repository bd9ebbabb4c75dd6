"""Variables as an object's state: the values a checkpoint holds for variables Keras does not
track (`fit/hidden_state.py`, `fit/input_state.py`), and their way back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from keras_ckpt.warn import warn

__all__ = ["values", "as_state", "arrays_of", "assign"]


def as_state(arrays: list) -> dict:
    """Arrays as an object state (`v_0000`, ...)."""
    return {f"v_{i:04d}": a for i, a in enumerate(arrays)}


def arrays_of(state: dict) -> list:
    """`as_state`'s arrays back, in order."""
    return [np.asarray(state[k]) for k in sorted(state) if k.startswith("v_")]


def values(variables: list) -> dict:
    """`variables`' values as an object state."""
    import keras

    return as_state([np.asarray(keras.ops.convert_to_numpy(v)) for v in variables])


def assign(variables: list, state: dict, what: str,
           put: Callable[[Any, np.ndarray], None] | None = None) -> None:
    """Puts `values`' state back into `variables` (`put(variable, array)`, else `assign`);
    warns (and puts nothing) where they are not the checkpoint's (`what` names them)."""
    saved = arrays_of(state)
    if [tuple(v.shape) for v in variables] != [a.shape for a in saved]:
        warn(f"ModelCheckpoint: {what} are not the checkpoint's ({len(variables)} against "
             f"{len(saved)}, or of other shapes): they start afresh, and the run will differ "
             "from an uninterrupted one.")
        return
    for variable, array in zip(variables, saved, strict=True):
        if put is None:
            variable.assign(array)
        else:
            put(variable, array)
