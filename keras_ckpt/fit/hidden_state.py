"""State a model keeps outside its variables, carried by keras-ckpt's checkpoints.

A stateful RNN layer (`keras.layers.LSTM(..., stateful=True)`) keeps the states
it carries from batch to batch in variables Keras makes untracked: they are not
in `model.variables`, so a resume would start them from zeros. They ride in
every checkpoint as the state of one object (`keras.rnn_states`), and a resumed
fit gets them back where the uninterrupted run had them:

- from an epoch-end checkpoint, before the next epoch's `on_epoch_begin` hooks
  (a user's `reset_states()` there runs after, as it did);
- from a mid-epoch checkpoint, at the first new batch's begin (the resumed
  epoch's begin hooks ran before the checkpoint in the uninterrupted run).
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from keras_ckpt import keras_compat
from keras_ckpt.warn import warn

__all__ = ["attach", "RnnStates"]


def _state_variables(model: Any) -> list:
    """Every stateful RNN layer's state variables, in the model's layer order."""
    import keras

    found = []
    for layer in keras_compat.flatten_layers(model):
        states = getattr(layer, "states", None) if getattr(layer, "stateful", False) else None
        if states is not None:
            found += [v for v in keras.tree.flatten(states) if isinstance(v, keras.Variable)]
    return found


class RnnStates:
    """The states of a model's stateful RNN layers, under `keras.rnn_states`."""

    state_key = "keras.rnn_states"

    def __init__(self, model: Any, session: Any) -> None:
        self._model = weakref.ref(model)
        self._session = weakref.ref(session)

    def get_state(self) -> dict:
        model = self._model()
        variables = _state_variables(model) if model is not None else []
        return {f"state_{i:04d}": _numpy(v) for i, v in enumerate(variables)}

    def set_state(self, state: dict) -> None:
        """Assigned before the next epoch's begin hooks, or after them where the checkpoint is
        in the middle of that epoch (see the module's docstring)."""
        session = self._session()

        def assign() -> None:
            model = self._model()
            variables = _state_variables(model) if model is not None else []
            saved = [np.asarray(state[k]) for k in sorted(state) if k.startswith("state_")]
            if [tuple(v.shape) for v in variables] != [a.shape for a in saved]:
                warn("ModelCheckpoint: the model's stateful RNN layers hold "
                     f"{len(variables)} state(s), the checkpoint {len(saved)} of other shapes: "
                     "their states start from zeros, and the run will differ from an "
                     "uninterrupted one.")
                return
            for variable, array in zip(variables, saved, strict=True):
                variable.assign(array)

        def at_epoch_begin() -> None:
            live = self._session()
            if live is not None and live.resumed_mid_epoch is not None:
                live.before_batch.append(assign)
            else:
                assign()

        if session is None or session.closed:
            assign()
        else:
            session.before_epoch.append(at_epoch_begin)


def _numpy(variable: Any) -> np.ndarray:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(variable))


def attach(session: Any) -> list[RnnStates]:
    """The adapter for the session's model, where it has stateful RNN layers (built or not)."""
    model = session.model
    if model is None or not any(getattr(layer, "stateful", False) and hasattr(layer, "states")
                                for layer in keras_compat.flatten_layers(model)):
        return []
    return [RnnStates(model, session)]
