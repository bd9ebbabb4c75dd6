"""Variables as an object's state: the values a checkpoint holds for variables Keras does not
track (`fit/hidden_state.py`, `fit/input_state.py`), and their way back."""

from __future__ import annotations

import numpy as np

from keras_ckpt.warn import warn

__all__ = ["values", "assign"]


def values(variables: list) -> dict:
    """`variables`' values as an object state (`v_0000`, ...)."""
    import keras

    return {f"v_{i:04d}": np.asarray(keras.ops.convert_to_numpy(v))
            for i, v in enumerate(variables)}


def assign(variables: list, state: dict, what: str) -> None:
    """Puts `values`' state back into `variables`; warns (and assigns nothing) where they are
    not the checkpoint's (`what` names them)."""
    saved = [np.asarray(state[k]) for k in sorted(state) if k.startswith("v_")]
    if [tuple(v.shape) for v in variables] != [a.shape for a in saved]:
        warn(f"ModelCheckpoint: {what} are not the checkpoint's ({len(variables)} against "
             f"{len(saved)}, or of other shapes): they start afresh, and the run will differ "
             "from an uninterrupted one.")
        return
    for variable, array in zip(variables, saved, strict=True):
        variable.assign(array)
