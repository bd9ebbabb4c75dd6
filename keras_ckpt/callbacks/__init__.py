"""The keras-ckpt callbacks."""

from keras_ckpt.callbacks.budget_stop import BudgetExhaustedError, BudgetStop
from keras_ckpt.callbacks.early_stopping import EarlyStopping
from keras_ckpt.callbacks.model_checkpoint import ModelCheckpoint
from keras_ckpt.callbacks.terminate_on_nan import NaNEvent, TerminateOnNaN

__all__ = ["BudgetExhaustedError", "BudgetStop", "EarlyStopping", "ModelCheckpoint", "NaNEvent",
           "TerminateOnNaN"]
