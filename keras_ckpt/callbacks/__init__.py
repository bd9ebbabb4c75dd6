"""The keras-ckpt callbacks."""

from keras_ckpt.callbacks.early_stopping import EarlyStopping
from keras_ckpt.callbacks.model_checkpoint import ModelCheckpoint
from keras_ckpt.callbacks.terminate_on_nan import NaNEvent, TerminateOnNaN

__all__ = ["EarlyStopping", "ModelCheckpoint", "NaNEvent", "TerminateOnNaN"]
