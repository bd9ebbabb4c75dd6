"""What every keras-ckpt callback shares: registration for checkpoints, Keras-style messages."""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable
from typing import Any

import keras

from keras_ckpt import registry

__all__ = ["StatefulCallback", "print_msg", "non_finite_logs", "guard_step_functions",
           "unguard_step_functions"]

try:  # Keras's own printing respects keras.config.disable_interactive_logging().
    from keras.src.utils.io_utils import print_msg as _keras_print_msg
except ImportError:  # pragma: no cover
    _keras_print_msg = None


def non_finite_logs(logs: dict | None) -> dict[str, float]:
    """The numeric log values that are NaN or infinite, by key, in log order."""
    bad = {}
    for key, value in (logs or {}).items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(number):
            bad[key] = number
    return bad


def guard_step_functions(model: Any, on_error: Callable[[str, BaseException], None],
                         on_result: Callable[[str, Any], None] | None = None) -> list:
    """Wraps `model.train_function` and `test_function` to see what escapes a step.

    `on_error(name, error)` runs before the error propagates; `on_result(name,
    result)` after each call that returns. Returns the guards for
    `unguard_step_functions`.
    """
    if hasattr(model, "make_test_function"):
        model.make_test_function()
    guards = []
    for name in ("train_function", "test_function"):
        inner = getattr(model, name, None)
        if inner is None:
            continue

        def guarded(*args, _inner=inner, _name=name, **kwargs):
            try:
                result = _inner(*args, **kwargs)
            except BaseException as e:
                on_error(_name, e)
                raise
            if on_result is not None:
                on_result(_name, result)
            return result

        setattr(model, name, guarded)
        guards.append((name, inner, guarded))
    fetch = _guard_torch_fetch(model, on_error)
    if fetch is not None:
        guards.append(fetch)
    return guards


_GUARDED_CLASSES: dict[type, type] = {}


def _guard_torch_fetch(model: Any, on_error: Callable[[str, BaseException], None]) -> tuple | None:
    """On torch, also sees errors of the data fetch, which Keras does outside the step.

    Keras's torch `fit` takes each batch from its epoch iterator before it
    calls `train_function` (TensorFlow and JAX fetch inside it). That iterator
    is a local of the running `fit`, found through the calling frames; its
    class is swapped for a subclass whose `__next__` reports errors. Returns
    a guard entry for `unguard_step_functions`, or None where there is none.
    """
    if keras.backend.backend() != "torch":
        return None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "fit" and frame.f_locals.get("self") is model:
            iterator = frame.f_locals.get("epoch_iterator")
            break
        frame = frame.f_back
    else:
        return None
    if iterator is None:
        return None
    if type(iterator) not in _GUARDED_CLASSES.values():
        base = type(iterator)
        if base not in _GUARDED_CLASSES:
            def __next__(self, _base=base):
                try:
                    return _base.__next__(self)
                except StopIteration:
                    raise
                except BaseException as e:
                    for handler in list(self._keras_ckpt_on_error):
                        handler("train_function", e)
                    raise

            _GUARDED_CLASSES[base] = type(base.__name__, (base,), {"__next__": __next__})
        iterator._keras_ckpt_on_error = []
        iterator._keras_ckpt_base = base
        iterator.__class__ = _GUARDED_CLASSES[base]
    iterator._keras_ckpt_on_error.append(on_error)
    return ("data", iterator, on_error)


def unguard_step_functions(model: Any, guards: list) -> None:
    """Undoes `guard_step_functions` (where nobody wrapped the functions further since)."""
    for name, inner, guarded in reversed(guards):
        if name == "data":  # the torch fetch guard: ("data", iterator, handler)
            handlers = inner._keras_ckpt_on_error
            if guarded in handlers:
                handlers.remove(guarded)
            if not handlers:
                inner.__class__ = inner._keras_ckpt_base
        elif getattr(model, name, None) is guarded:
            setattr(model, name, inner)


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

    End-of-epoch work goes in `epoch_end(epoch, logs)`, not `on_epoch_end`: a
    `ModelCheckpoint` runs it ("settles" the epoch) before it captures the
    state, wherever this callback stands in the list, and Keras's own call
    afterwards does nothing. So the saved state always includes the epoch.

    A subclass that declares `async_safe` must expect its batch hooks on
    Keras's callback thread pool (JAX, torch): several may run at once and
    finish out of order. `hook_lock` serialises them; `on_training_thread()`
    tells a hook whether it runs synchronously.
    """

    state_key: str = ""

    def __init__(self) -> None:
        super().__init__()
        if not self.state_key:
            self.state_key = type(self).__name__
        self.hook_lock = threading.Lock()
        self._train_thread: int | None = None

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model)
        registry.attach(model, self)

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._fit = registry.seal(self.model)
        self._train_thread = threading.get_ident()

    def on_training_thread(self) -> bool:
        """Whether this hook runs on fit's own thread (not Keras's callback pool)."""
        return self._train_thread is None or threading.get_ident() == self._train_thread

    def replaying(self, batch: int) -> bool:
        """Whether batch end `batch` is a resume's replay of a step trained before.

        Cheap and safe on Keras's callback thread: it reads the fit's record,
        not `self.model` (which, on JAX, would sync the training state).
        """
        fit = getattr(self, "_fit", None)
        return fit is not None and batch < fit.replay_until

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.settle_epoch_end(epoch, logs)

    def settle_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Runs `epoch_end` for `epoch` unless it already ran in this fit."""
        key = (registry.current_fit(self.model), epoch)
        settled = getattr(self, "_settled", None)
        if settled is not None and settled[0] is key[0] and settled[1] == epoch:
            return
        self._settled = key
        if registry.cut_short(self.model) == epoch:
            return  # a stop ended it early: its logs describe part of an epoch
        self.epoch_end(epoch, logs if logs is not None else {})

    def epoch_end(self, epoch: int, logs: dict) -> None:
        """This callback's end-of-epoch work (override; runs once an epoch)."""

    def finished(self) -> str | None:
        """Why a resumed run must not train further (e.g. it already stopped), or None."""
        return None

    def blocks_saving(self) -> str | None:
        """Why the model's current state must not be checkpointed (e.g. it is not finite)."""
        return None

    def on_abort(self, reason: str) -> None:
        """A sibling is about to end `fit` with an exception (e.g. TerminateOnNaN's raise)."""

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
