"""The keras-ckpt callbacks."""

from keras_ckpt.callbacks.early_stopping import EarlyStopping
from keras_ckpt.callbacks.model_checkpoint import ModelCheckpoint

__all__ = ["EarlyStopping", "ModelCheckpoint"]
