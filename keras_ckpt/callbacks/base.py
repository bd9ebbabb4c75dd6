"""What every keras-ckpt callback shares: registration for checkpoints, Keras-style messages."""

from __future__ import annotations

import keras

from keras_ckpt import registry

__all__ = ["StatefulCallback", "print_msg"]

try:  # Keras's own printing respects keras.config.disable_interactive_logging().
    from keras.src.utils.io_utils import print_msg as _keras_print_msg
except ImportError:  # pragma: no cover
    _keras_print_msg = None


def print_msg(message: str) -> None:
    """Prints through Keras's logging (stdout or absl, as Keras is configured)."""
    if _keras_print_msg is not None:
        _keras_print_msg(message)
    else:  # pragma: no cover
        print(message)


class StatefulCallback(keras.callbacks.Callback):
    """A callback whose state rides in every keras-ckpt checkpoint of its fit.

    Subclasses implement `get_state()` / `set_state(state)` (JSON values and
    numpy arrays) and may set `state_key` (default: the class name). A
    `ModelCheckpoint` that resumes calls `restore_state`; a subclass's
    `on_train_begin` must then keep what was restored (see
    `restored_this_fit`) instead of resetting it.
    """

    state_key: str = ""

    def __init__(self) -> None:
        super().__init__()
        if not self.state_key:
            self.state_key = type(self).__name__

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model)
        registry.attach(model, self)

    def on_train_begin(self, logs: dict | None = None) -> None:
        registry.seal(self.model)

    def restore_state(self, state: dict) -> None:
        """Applies a saved state and remembers that this fit resumed it."""
        self.set_state(state)
        self._restored_in = registry.current_fit(self.model)

    def restored_this_fit(self) -> bool:
        """True when a resume in the current fit restored this callback's state."""
        token = getattr(self, "_restored_in", None)
        return token is not None and token is registry.current_fit(self.model)

    def get_state(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_state(self, state: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
