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


def _encode(value: Any) -> Any:
    """For `json.dumps`: a NumPy array (MT19937's, Philox's keys) as its list and dtype."""
    if isinstance(value, np.ndarray):
        return {"ndarray": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.integer):
        return int(value)
    raise TypeError(f"{type(value).__name__} in a generator's state")


def _decode(entry: dict) -> Any:
    return np.array(entry["ndarray"], dtype=np.dtype(entry["dtype"])) \
        if set(entry) == {"ndarray", "dtype"} else entry


def _state_of(generator: Any) -> Any:
    """A generator's state as JSON text or an array (no pickle: a checkpoint is data)."""
    if isinstance(generator, np.random.Generator):
        return json.dumps(generator.bit_generator.state, default=_encode)
    if isinstance(generator, np.random.RandomState):
        kind, keys, pos, has_gauss, cached = generator.get_state()
        return json.dumps([kind, keys.tolist(), int(pos), int(has_gauss), float(cached)])
    if isinstance(generator, random.Random):
        return json.dumps(generator.getstate())
    return generator.get_state().numpy().copy()  # torch.Generator: uint8


def _set_state(generator: Any, state: Any) -> None:
    if isinstance(generator, np.random.Generator):
        generator.bit_generator.state = json.loads(state, object_hook=_decode)
    elif isinstance(generator, np.random.RandomState):
        kind, keys, pos, has_gauss, cached = json.loads(state)
        generator.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    elif isinstance(generator, random.Random):
        version, internal, gauss = json.loads(state)
        generator.setstate((version, tuple(internal), gauss))
    else:
        import torch

        generator.set_state(torch.from_numpy(np.asarray(state, dtype=np.uint8).copy()))


def _scratch(generator: Any) -> Any:
    """A new generator of the same kind, to try a state on first."""
    if isinstance(generator, np.random.Generator):
        return np.random.Generator(type(generator.bit_generator)())
    return type(generator)()


def _encodable(generator: Any) -> bool:
    try:
        _state_of(generator)
    except Exception as e:  # (any: a bit generator of another kind)
        warn(f"ModelCheckpoint: the input holds a random generator whose state keras-ckpt "
             f"cannot write ({type(generator).__name__}: {e}): a resume starts it afresh, and "
             "the run will differ from an uninterrupted one.")
        return False
    return True


def marker(generators: list) -> tuple:
    """What changes when anything draws from `generators`."""
    return tuple(s if isinstance(s := _state_of(g), str) else s.tobytes() for g in generators)


class InputGenerators:
    """The random generators the fit's inputs hold (see the module docstring)."""

    state_key = "data:input generators"

    def __init__(self, generators: list) -> None:
        self._generators = generators

    def get_state(self) -> dict:
        """Each generator's state, `g_0000`, ... (JSON text, or torch's bytes)."""
        return {f"g_{i:04d}": _state_of(g) for i, g in enumerate(self._generators)}

    def set_state(self, state: dict) -> None:
        """All of them, each state tried on a new generator of its kind first; where any does
        not fit (another input, a damaged or hostile file), none, with a warning."""
        saved = [state[k] for k in sorted(state) if k.startswith("g_")]
        problem = None if len(saved) == len(self._generators) else \
            f"{len(self._generators)} against {len(saved)}"
        for generator, value in zip(self._generators, saved, strict=False):
            try:
                _set_state(_scratch(generator), value)
            except Exception as e:  # (any: the state is data from a file)
                problem = problem or f"{type(e).__name__}: {e}"
        if problem is not None:
            warn("ModelCheckpoint: the random generators the input holds cannot take the "
                 f"checkpoint's states ({problem}): they go on from where they are, and the "
                 "run will differ from an uninterrupted one.")
            return
        for generator, value in zip(self._generators, saved, strict=True):
            _set_state(generator, value)


class PipelineVariables:
    """The variables the fit's tf.data inputs keep state in (see the module docstring)."""

    state_key = "data:tf.data variables"

    def __init__(self, variables: list) -> None:
        self._variables = variables

    def get_state(self) -> dict:
        """The variables' values (`variable_state.values`)."""
        return values(self._variables)

    def set_state(self, state: dict) -> None:
        """Assigned now (at train begin, before the epoch's iterator runs the functions)."""
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
    generators = {id(g): g for data in inputs for g in generators_of(data) if _encodable(g)}
    return ([InputGenerators(list(generators.values()))] if generators else []) + (
        [PipelineVariables(list(variables.values()))] if variables else [])
