"""State a fit's inputs keep that a resume must give back: their random generators and the
variables of their tf.data functions.

Both ride in every checkpoint as "data:" states: a mid-epoch checkpoint holds them as they were
at the epoch's begin (`fit.epoch_data_states`), and the resumed epoch reads its trained batches
again from there where they draw (`epoch_skip.indexed_from` reads them all when one draws).

- `InputGenerators`: the random generators a `keras.utils.PyDataset` holds as attributes
  (`self.rng = np.random.default_rng(seed)` for augmentation or its order; NumPy's
  `Generator` or `RandomState`, Python's `random.Random`, a `torch.Generator`), and a torch
  `DataLoader`'s own `generator=` (and its sampler's), for training and validation input.
- `PipelineVariables`: the TensorFlow variables the functions of a tf.data input keep state in
  (a Keras random layer's `SeedGenerator` in a `.map`, Keras's documented way to augment in
  the pipeline; a `tf.random.Generator`).
"""

from __future__ import annotations

import json
import random
import sys
from typing import Any

import numpy as np

from keras_ckpt import keras_compat
from keras_ckpt.fit.variable_state import assign, values
from keras_ckpt.warn import warn

__all__ = ["attach", "InputGenerators", "PipelineVariables", "generators_of", "marker"]


def _is_generator(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return isinstance(value, (np.random.Generator, np.random.RandomState, random.Random)) or (
        torch is not None and isinstance(value, torch.Generator))


def generators_of(data: Any) -> list:
    """The random generators `data` holds as attributes (and a torch `DataLoader`'s sampler's),
    each once, in attribute order; [] for arrays and anything without attributes."""
    found: dict[int, Any] = {}
    holders = [data, getattr(data, "sampler", None),
               getattr(getattr(data, "batch_sampler", None), "sampler", None)]
    for holder in holders:
        try:
            values = list(vars(holder).values()) if holder is not None else []
        except TypeError:  # no __dict__ (an array, a tensor)
            continue
        found.update((id(v), v) for v in values if _is_generator(v))
    return list(found.values())


def _state_of(generator: Any) -> Any:
    """A generator's state as JSON text or an array (no pickle: a checkpoint is data)."""
    if isinstance(generator, np.random.Generator):
        return json.dumps(generator.bit_generator.state)
    if isinstance(generator, np.random.RandomState):
        kind, keys, pos, has_gauss, cached = generator.get_state()
        return json.dumps([kind, keys.tolist(), int(pos), int(has_gauss), float(cached)])
    if isinstance(generator, random.Random):
        return json.dumps(generator.getstate())
    return generator.get_state().numpy().copy()  # torch.Generator: uint8


def _set_state(generator: Any, state: Any) -> None:
    if isinstance(generator, np.random.Generator):
        generator.bit_generator.state = json.loads(state)
    elif isinstance(generator, np.random.RandomState):
        kind, keys, pos, has_gauss, cached = json.loads(state)
        generator.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    elif isinstance(generator, random.Random):
        version, internal, gauss = json.loads(state)
        generator.setstate((version, tuple(internal), gauss))
    else:
        import torch

        generator.set_state(torch.from_numpy(np.asarray(state, dtype=np.uint8).copy()))


def marker(generators: list) -> tuple:
    """What changes when anything draws from `generators`."""
    return tuple(s if isinstance(s := _state_of(g), str) else s.tobytes() for g in generators)


class InputGenerators:
    """The random generators the fit's inputs hold (see the module docstring)."""

    state_key = "data:input generators"

    def __init__(self, generators: list) -> None:
        self._generators = generators

    def get_state(self) -> dict:
        return {f"g_{i:04d}": _state_of(g) for i, g in enumerate(self._generators)}

    def set_state(self, state: dict) -> None:
        saved = [state[k] for k in sorted(state) if k.startswith("g_")]
        if len(saved) != len(self._generators):
            warn("ModelCheckpoint: the random generators the input holds are not the "
                 f"checkpoint's ({len(self._generators)} against {len(saved)}): they start "
                 "afresh, and the run will differ from an uninterrupted one.")
            return
        try:
            for generator, value in zip(self._generators, saved, strict=True):
                _set_state(generator, value)
        except (TypeError, ValueError, KeyError, RuntimeError) as e:
            warn(f"ModelCheckpoint: the input's random generators could not take the "
                 f"checkpoint's states ({e}): they go on from where they are, and the run will "
                 "differ from an uninterrupted one.")


class PipelineVariables:
    """The variables the fit's tf.data inputs keep state in (see the module docstring)."""

    state_key = "data:tf.data variables"

    def __init__(self, variables: list) -> None:
        self._variables = variables

    def get_state(self) -> dict:
        return values(self._variables)

    def set_state(self, state: dict) -> None:
        assign(self._variables, state, "the variables of the tf.data input's functions")


def attach(model: Any) -> list:
    """The adapters for the running fit's `x` and `validation_data`: their generators, their
    tf.data functions' variables (less any the model holds)."""
    from keras_ckpt.inputs import pipeline_variables

    arguments = keras_compat.fit_arguments(model) or {}
    inputs = [arguments.get("x"), arguments.get("validation_data")]
    held = {id(getattr(v, "value", v)) for v in getattr(model, "variables", None) or []}
    variables = {id(v): v for data in inputs for v in pipeline_variables(data)
                 if id(v) not in held}
    generators = {id(g): g for data in inputs for g in generators_of(data)}
    return ([InputGenerators(list(generators.values()))] if generators else []) + (
        [PipelineVariables(list(variables.values()))] if variables else [])
