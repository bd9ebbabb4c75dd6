"""The keras-ckpt callbacks."""

from keras_ckpt.callbacks.model_checkpoint import ModelCheckpoint

__all__ = ["ModelCheckpoint"]
