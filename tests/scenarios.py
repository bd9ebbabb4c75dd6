"""The scenario matrix's training scripts (tests/test_scenario_matrix.py), as a user writes them.

Each `Script` builds, in a fresh process seeded by tests/matrix_child.py, a
compiled model, what `fit` is given and the Keras callbacks beside ours. Every
script trains 4 epochs of 4 steps with 2 validation batches (what the kills
in the matrix need) and says what a resume must give: `exact` (bitwise the
uninterrupted run) or a warning at train begin (`warns`, a regex). Builders
run only in the child process (one sets the global mixed-precision policy).

The scripts cover optimizers (scripts_optimizers), model kinds
(scripts_models) and inputs, fit arguments and Keras callbacks
(scripts_inputs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

__all__ = ["Script", "SCRIPTS", "BACKENDS", "WARNS", "MID_STEP", "script", "dense_model",
           "regression", "FEATURES"]

FEATURES = 5
BATCH = 8
TRAIN, VALIDATION = 4 * BATCH, 2 * BATCH


@dataclasses.dataclass
class Script:
    """What one training script gives `fit`, and what its resume must give."""

    model: keras.Model
    fit: dict[str, Any]
    callbacks: list = dataclasses.field(default_factory=list)
    checkpoint: dict[str, Any] = dataclasses.field(default_factory=dict)


SCRIPTS: dict[str, Callable[[], Script]] = {}
BACKENDS: dict[str, tuple[str, ...]] = {}  # the backends a script runs on (default: all)
WARNS: dict[str, str | None] = {}  # the warning its resumes give; None: bitwise exact
MID_STEP: dict[str, int] = {}  # the step of epoch 3 after which the mid-epoch kill comes


def script(name: str, backends: tuple[str, ...] = ("tensorflow", "jax", "torch"),
           warns: str | None = None, mid_step: int = 3):
    """Registers a script builder under `name` (built only in the child that runs it).

    `mid_step`: with steps_per_execution=2 the batch hooks come every second
    step, so the mid-epoch kill is after step 2 (the newest checkpoint's).
    """
    def register(build: Callable[[], Script]) -> Callable[[], Script]:
        SCRIPTS[name], BACKENDS[name], WARNS[name] = build, backends, warns
        MID_STEP[name] = mid_step
        return build
    return register


def regression(n: int = TRAIN + VALIDATION, features: int = FEATURES, seed: int = 0):
    """(x, y, x_val, y_val): a linear target with noise; the last 16 rows validate."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = (x @ rng.normal(size=(features, 1)) + 0.1 * rng.normal(size=(n, 1))).astype("float32")
    return x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:]


def dense_model(optimizer: Any = "adam", *middle: keras.layers.Layer, loss: str = "mse",
                metrics: list | None = None, outputs: int = 1) -> keras.Model:
    """Input, Dense(16, relu), `middle`, Dense(outputs); compiled."""
    model = keras.Sequential([keras.Input((FEATURES,)),
                              keras.layers.Dense(16, activation="relu"), *middle,
                              keras.layers.Dense(outputs)])
    model.compile(optimizer, loss=loss, metrics=metrics if metrics is not None else ["mae"])
    return model


def arrays_fit(x=None, y=None, x_val=None, y_val=None, **kwargs) -> dict[str, Any]:
    """`fit` arguments for numpy inputs (batch 8, the default shuffle) and validation data."""
    if x is None:
        x, y, x_val, y_val = regression()
    return {"x": x, "y": y, "batch_size": BATCH, "validation_data": (x_val, y_val), **kwargs}


import scripts_inputs  # noqa: E402,F401 - they register themselves
import scripts_models  # noqa: E402,F401
import scripts_optimizers  # noqa: E402,F401
