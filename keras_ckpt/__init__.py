"""keras-ckpt: Keras 3 callbacks that make long training safe to interrupt and exact to resume."""

from keras_ckpt import data
from keras_ckpt.callbacks import ModelCheckpoint
from keras_ckpt.manager import (
    CheckpointInfo,
    best_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    restore,
)
from keras_ckpt.monitor import Decision, Monitor, infer_mode
from keras_ckpt.retention import KeepBest, KeepEvery, KeepLast
from keras_ckpt.state import StateMismatchError
from keras_ckpt.storage import CorruptCheckpointError

__version__ = "0.1.0"

__all__ = [
    "ModelCheckpoint",
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
    "__version__",
]
