"""State a fit keeps outside the model's variables, carried by keras-ckpt's checkpoints.

A stateful RNN layer (`keras.layers.LSTM(..., stateful=True)`) keeps the states
it carries from batch to batch in variables Keras makes untracked: they are not
in `model.variables`, so a resume would start them from zeros. They ride in
every checkpoint as the state of one object (`keras.rnn_states`), and a resumed
fit gets them back where the uninterrupted run had them:

- from an epoch-end checkpoint, before the next epoch's `on_epoch_begin` hooks
  (a user's `reset_states()` there runs after, as it did);
- from a mid-epoch checkpoint, at the first new batch's begin (the resumed
  epoch's begin hooks ran before the checkpoint in the uninterrupted run).

A loss or metric object passed to `compile` may hold a `SeedGenerator` or a
`keras.Variable` of its own (a noisy loss, a running normaliser), and so may an
optimizer (gradient noise), a layer's regularizer or constraint of the user's
classes, and the objects, dicts and lists they hold: Keras tracks none of them.
They ride along as `keras.loss_and_metric_state`, in the order found at each
save; one made in a first call (after train begin) cannot be given its state
back before it is used, so a resume says so.

Unseeded `keras.random` calls (`keras.random.normal(shape)` in a custom layer)
draw from Keras's global `SeedGenerator`, which Keras makes at first use from
Python's `random`: its state rides along as `keras.global_seed_generator`, and
a resume makes it before the Python RNG state is put back, then sets its state.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from keras_ckpt import keras_compat
from keras_ckpt.fit import input_state
from keras_ckpt.fit.keras_callbacks import at_next_epoch
from keras_ckpt.fit.variable_state import arrays_of, as_state, assign, values
from keras_ckpt.warn import warn

__all__ = ["attach", "RnnStates", "GlobalSeedGenerator", "OwnedByLossesAndMetrics",
           "TorchBuffers", "OtherOptimizers"]


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
        return values(_state_variables(model) if model is not None else [])

    def set_state(self, state: dict) -> None:
        """Assigned before the next epoch's begin hooks, or after them where the checkpoint is
        in the middle of that epoch (see the module's docstring)."""
        def put_back() -> None:
            model = self._model()
            assign(_state_variables(model) if model is not None else [], state,
                   "the model's stateful RNN layers' states")

        def at_epoch_begin() -> None:
            live = self._session()
            if live is not None and live.resumed_mid_epoch is not None:
                live.before_batch.append(put_back)
            else:
                put_back()

        at_next_epoch(self._session(), at_epoch_begin)


class GlobalSeedGenerator:
    """The state of Keras's global `SeedGenerator`, where a fit made it (nothing else)."""

    state_key = "keras.global_seed_generator"

    def get_state(self) -> dict:
        generator = keras_compat.global_seed_generator()
        return {} if generator is None else values([generator.state])

    def set_state(self, state: dict) -> None:
        """Now: `state.apply` puts the Python RNG state back after the objects' states, so the
        draw that makes the generator leaves no trace."""
        if state:
            assign([keras_compat.global_seed_generator(create=True).state], state,
                    "Keras's global seed generator's state")


def _compiled_objects(model: Any) -> list:
    """The compiled loss and metric objects (`keras.losses.Loss`, `keras.metrics.Metric`)."""
    import keras

    metrics = [m for top in getattr(model, "metrics", None) or []
               for m in [top, *(getattr(top, "metrics", None) or [])]]
    return [obj for obj in [*keras.tree.flatten(getattr(model, "loss", None)), *metrics]
            if isinstance(obj, (keras.losses.Loss, keras.metrics.Metric))]


def _kinds() -> tuple:
    import keras

    return (keras.losses.Loss, keras.metrics.Metric, keras.optimizers.Optimizer,
            keras.regularizers.Regularizer, keras.constraints.Constraint)


def _users(objects: list) -> list:
    """Those of the user's classes (Keras's own track what they hold)."""
    return [obj for obj in objects
            if isinstance(obj, _kinds()) and not type(obj).__module__.startswith("keras.")]


def _layer_parts(model: Any) -> list:
    """The layers' regularizers and constraints of the user's classes."""
    import keras

    parts = (keras.regularizers.Regularizer, keras.constraints.Constraint)
    return _users([value for layer in keras_compat.flatten_layers(model)
                   for value in vars(layer).values() if isinstance(value, parts)])


def _roots(model: Any, layer_parts: list) -> list:
    """The objects of the user's classes around the model: the compiled loss and metric
    objects, the optimizer (a wrapper's inner one too), `layer_parts`."""
    optimizer = getattr(model, "optimizer", None)
    return _users([*_compiled_objects(model), optimizer,
                   getattr(optimizer, "inner_optimizer", None), *layer_parts])


def _owned(model: Any, layer_parts: list) -> list:
    """Variables that `_roots` and the objects of the user's classes, dicts, lists and tuples
    they hold keep and Keras does not track, in the order found."""
    import keras

    optimizer = getattr(model, "optimizer", None)
    tracked = {id(v) for group in (getattr(model, "variables", None) or [],
                                   getattr(model, "metrics_variables", None) or [],
                                   getattr(optimizer, "variables", None) or [])
               for v in group}
    found: list = []
    stack = _roots(model, layer_parts)[::-1]
    seen = {id(obj) for obj in stack}
    while stack:
        for value in vars(stack.pop()).values():
            for item in keras.tree.flatten(value) if isinstance(value, (dict, list, tuple)) \
                    else [value]:
                item = item.state if isinstance(item, keras.random.SeedGenerator) else item
                if isinstance(item, keras.Variable) and id(item) not in tracked:
                    tracked.add(id(item))
                    found.append(item)
                elif _users([item]) and id(item) not in seen:  # (depth first, in order)
                    seen.add(id(item))
                    stack.append(item)
    return found


class OwnedByLossesAndMetrics:
    """What the loss, metric, optimizer, regularizer and constraint objects of the user's
    classes hold untracked (see the module docstring)."""

    state_key = "keras.loss_and_metric_state"

    def __init__(self, model: Any, layer_parts: list) -> None:
        self._model = weakref.ref(model)
        self._layer_parts = layer_parts

    def get_state(self) -> dict:
        model = self._model()
        return values(_owned(model, self._layer_parts) if model is not None else [])

    def set_state(self, state: dict) -> None:
        """Now (at train begin). One made in a first call (after train begin) cannot be given
        its state before it is used: said, with the fix."""
        model = self._model()
        owned = _owned(model, self._layer_parts) if model is not None else []
        saved = len([k for k in state if k.startswith("v_")])
        if len(owned) < saved:
            warn("ModelCheckpoint: the checkpoint holds state of the loss, metric or optimizer "
                 f"objects ({saved} variable(s)) that they have not made at train begin "
                 f"({len(owned)} now): one that makes a variable or SeedGenerator in its first "
                 "call starts it afresh, and the run will differ from an uninterrupted one. "
                 "Make them in its __init__.")
            return
        assign(owned, state, "the variables the loss, metric and optimizer objects hold")


class TorchBuffers:
    """The buffers of the torch modules in `keras.layers.TorchModuleWrapper` layers (a
    `BatchNorm1d`'s running statistics): in the module's `state_dict`, which Keras's own
    saving writes, but not Keras variables."""

    state_key = "keras.torch_module_buffers"

    def __init__(self, buffers: list) -> None:
        self._buffers = buffers

    def get_state(self) -> dict:
        """The buffers' values in layer order (`variable_state.as_state`)."""
        return as_state([b.detach().cpu().numpy().copy() for b in self._buffers])

    def set_state(self, state: dict) -> None:
        """Copied in now (at train begin), where they are the checkpoint's; else a warning."""
        import torch

        def put(buffer: Any, array: np.ndarray) -> None:
            buffer.copy_(torch.from_numpy(array.copy()).to(buffer.device))

        with torch.no_grad():
            assign(self._buffers, state, "the buffers of the model's torch modules", put)


def _torch_buffers(model: Any) -> list:
    """The buffers of the modules of the model's `TorchModuleWrapper` layers, in layer order."""
    found: dict = {}
    for layer in keras_compat.flatten_layers(model):
        if type(layer).__name__ == "TorchModuleWrapper" and hasattr(layer, "module"):
            found.update((id(b), b) for b in layer.module.buffers())
    return list(found.values())


class OtherOptimizers:
    """Optimizers the model holds besides `model.optimizer`, by attribute name: a custom
    `train_step` applying its own (Keras's GAN example's `d_optimizer` and `g_optimizer`).
    Keras builds one at its first `apply`, with the variables it is given: a resume assigns a
    built one now, and an unbuilt one right after Keras builds it, before its first update."""

    state_key = "keras.other_optimizers"

    def __init__(self, model: Any, names: list[str], session: Any) -> None:
        self._model = weakref.ref(model)
        self._names = names
        self._session = weakref.ref(session)

    def _optimizers(self) -> list:
        model = self._model()
        return [] if model is None else [(n, getattr(model, n, None)) for n in self._names]

    def get_state(self) -> dict:
        return {f"{name}.{key}": value for name, optimizer in self._optimizers()
                for key, value in values(list(optimizer.variables)).items()}

    def set_state(self, state: dict) -> None:
        for name, optimizer in self._optimizers():
            saved = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"{name}.")}
            what = f"the variables of the model's optimizer {name!r}"
            if not saved:
                continue
            if optimizer.built or len(optimizer.variables) == len(saved):
                assign(list(optimizer.variables), saved, what)
            else:
                _assign_when_built(optimizer, saved, what, self._session())


def _assign_when_built(optimizer: Any, saved: dict, what: str, session: Any = None) -> None:
    """Puts `saved` (`values` of a built optimizer) into the unbuilt `optimizer`: what it has
    already (its step count, its learning rate) now, the rest (the slots) right after Keras
    builds it (in a traced step on TensorFlow: outside the trace, once). The hook goes with
    `session` (a fit) where it never fires."""
    import contextlib

    import keras

    from keras_ckpt.epoch_skip import shadow_once

    arrays = arrays_of(saved)
    now = len(optimizer.variables)
    assign(list(optimizer.variables), as_state(arrays[:now]), what)

    def build(original: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        outside = contextlib.nullcontext()
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            outside = tf.init_scope()
        with outside:
            assign(list(optimizer.variables)[now:], as_state(arrays[now:]), what)
        return result

    undo = shadow_once(optimizer, "build", build)
    if session is not None and not session.closed:
        session.on_close(f"{what}: assigned when built", undo)


def _other_optimizers(model: Any) -> list[str]:
    """The names of the model's attributes holding an optimizer other than `model.optimizer`."""
    import keras

    main = getattr(model, "optimizer", None)
    return sorted(name for name, value in vars(model).items()
                  if isinstance(value, keras.optimizers.Optimizer) and value is not main
                  and value is not getattr(main, "inner_optimizer", None))


def attach(session: Any) -> list:
    """The adapters for the session's model: the global seed generator's; where the model has
    them, its other optimizers', its torch modules' buffers, its inputs'
    (`input_state.attach`), what objects of the user's classes hold, and its stateful RNN
    layers' states (built or not)."""
    model = session.model
    found: list = [GlobalSeedGenerator()]
    if model is not None and (names := _other_optimizers(model)):
        found.append(OtherOptimizers(model, names, session))
    if model is not None and (buffers := _torch_buffers(model)):
        found.append(TorchBuffers(buffers))
    if model is not None:  # the inputs' generators and tf.data variables
        found += input_state.attach(model)
    parts = _layer_parts(model) if model is not None else []
    if model is not None and _roots(model, parts):  # (what they make later rides too)
        found.append(OwnedByLossesAndMetrics(model, parts))
    if model is not None and any(getattr(layer, "stateful", False) and hasattr(layer, "states")
                                 for layer in keras_compat.flatten_layers(model)):
        found.append(RnnStates(model, session))
    return found
