"""keras-ckpt: Keras 3 callbacks that make long training safe to interrupt and exact to resume.

The callbacks (and `keras_ckpt.data`) are imported on first use, so that
tools that only read checkpoints (`python -m keras_ckpt inspect`) do not load
a Keras backend.
"""

from __future__ import annotations

import importlib
from typing import Any

from keras_ckpt.dirlock import DirectoryInUseError
from keras_ckpt.manager import (
    CheckpointInfo,
    best_checkpoint,
    latest_checkpoint,
    list_checkpoints,
)
from keras_ckpt.monitor import Decision, Monitor, infer_mode
from keras_ckpt.restoring import restore
from keras_ckpt.retention import KeepBest, KeepEvery, KeepLast
from keras_ckpt.state import StateMismatchError
from keras_ckpt.storage import CorruptCheckpointError, ForeignFileError

__version__ = "0.1.0"

_LAZY = {"ModelCheckpoint": "keras_ckpt.callbacks", "EarlyStopping": "keras_ckpt.callbacks",
         "TerminateOnNaN": "keras_ckpt.callbacks", "NaNEvent": "keras_ckpt.callbacks",
         "BudgetStop": "keras_ckpt.callbacks", "BudgetExhaustedError": "keras_ckpt.callbacks",
         "data": "keras_ckpt.data"}

__all__ = [
    "ModelCheckpoint",
    "EarlyStopping",
    "TerminateOnNaN",
    "NaNEvent",
    "BudgetStop",
    "BudgetExhaustedError",
    "data",
    "Monitor",
    "Decision",
    "infer_mode",
    "KeepLast",
    "KeepBest",
    "KeepEvery",
    "CheckpointInfo",
    "list_checkpoints",
    "latest_checkpoint",
    "best_checkpoint",
    "restore",
    "StateMismatchError",
    "CorruptCheckpointError",
    "ForeignFileError",
    "DirectoryInUseError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'keras_ckpt' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if name == "data" else getattr(module, name)
    globals()[name] = value
    return value
