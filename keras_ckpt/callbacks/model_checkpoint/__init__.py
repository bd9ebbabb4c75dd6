"""`ModelCheckpoint` and its collaborators (see docs/architecture.md for the map)."""

from keras_ckpt.callbacks.model_checkpoint.callback import ModelCheckpoint
from keras_ckpt.callbacks.model_checkpoint.policies import (
    BestOnly,
    EveryEpoch,
    EveryInterval,
    EveryNSteps,
)

__all__ = ["ModelCheckpoint", "EveryNSteps", "EveryInterval", "EveryEpoch", "BestOnly"]
