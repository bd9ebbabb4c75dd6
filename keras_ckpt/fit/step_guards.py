"""The one wrapper around a fit's `train_function` and `test_function`.

A session installs it when the fit begins and removes it when the fit ends.
It lets keras-ckpt see what escapes a step (an exception ends the fit: the
listeners run, then the session closes), what each call returns, and lets a
mid-epoch resume replace the first calls of the resumed epoch (`replay`).
The end of the data (`StopIteration`, TensorFlow's `OutOfRangeError`) is how
Keras learns an epoch of unknown length is over: it passes untouched.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from keras_ckpt import keras_compat
from keras_ckpt.fit.first_trace import hidden_random_ops
from keras_ckpt.warn import warn

__all__ = ["StepGuards", "is_end_of_data"]

_NAMES = ("train_function", "test_function")


def is_end_of_data(error: BaseException) -> bool:
    """Whether `error` says the data ran out (not a failure; TF: `OutOfRangeError`)."""
    return isinstance(error, StopIteration) or type(error).__name__ == "OutOfRangeError"


class StepGuards:
    """Wraps the model's step functions for one fit.

    Attributes:
        replay: None, or `replay(original, *args)` called instead of the
            train function while a resume consumes the batches it had trained.
    """

    def __init__(self, model: Any, session: Any) -> None:
        self._model = weakref.ref(model)
        self._session = weakref.ref(session)
        self.replay: Callable[..., Any] | None = None
        self._result_listeners: list[Callable[[str, Any], None]] = []
        self._error_listeners: list[Callable[[str, BaseException], None]] = []
        self._installed: list[tuple[str, Any, Any]] = []
        self._traced_checked = False
        if getattr(model, "compiled", False):
            try:
                keras_compat.make_test_function(model)
            except Exception:  # a model Keras cannot evaluate yet: nothing to guard there
                pass
        for name in _NAMES:
            original = getattr(model, name, None)
            if original is None:
                continue
            wrapper = self._wrap(name, original)
            setattr(model, name, wrapper)
            self._installed.append((name, original, wrapper))
        self._fetch = keras_compat.guard_torch_fetch(model, self.step_failed)

    def on_result(self, listener: Callable[[str, Any], None]) -> None:
        """Calls `listener(name, result)` after each call that returns."""
        self._result_listeners.append(listener)

    def on_step_error(self, listener: Callable[[str, BaseException], None]) -> None:
        """Calls `listener(name, error)` when a step raises, before the fit closes."""
        self._error_listeners.append(listener)

    def _wrap(self, name: str, original: Callable) -> Callable:
        guards = weakref.ref(self)
        training = name == "train_function"

        def guarded(*args: Any, **kwargs: Any) -> Any:
            live = guards()
            replayed = training and live is not None and live.replay is not None
            try:
                if replayed:
                    result = live.replay(original, *args)
                else:
                    result = original(*args, **kwargs)
            except BaseException as e:
                if live is not None and not is_end_of_data(e):
                    live.step_failed(name, e)
                raise
            if live is not None:
                if training and not replayed and not live._traced_checked:  # (now traced)
                    live._traced_checked = True
                    live._check_trace(original)
                for listener in live._result_listeners:
                    listener(name, result)
            return result

        return guarded

    def _check_trace(self, train_function: Any) -> None:
        """After the first train call: the random ops whose state no checkpoint can hold, and a
        compiled optimizer the step did not apply (steps are counted by its iterations)."""
        optimizer, session = getattr(self._model(), "optimizer", None), self._session()
        if optimizer is not None and not getattr(optimizer, "built", True) and session:
            session.steps_uncounted = True
            warn("keras-ckpt: this model's train_step did not apply model.optimizer (it "
                 "applies optimizers of its own, as Keras's GAN example does), and keras-ckpt "
                 "counts a fit's steps with model.optimizer.iterations: this fit writes no "
                 "checkpoint inside an epoch (save_freq in steps, on an error, on a signal), "
                 "only at epoch ends, from which a resume is exact. save_freq='epoch' says "
                 "so; a train_step that applies model.optimizer once a step counts them.")
        found = hidden_random_ops(train_function)
        if found:
            warn(f"keras-ckpt: the train step runs TensorFlow random ops that keep their "
                 f"state outside every variable ({', '.join(found)}, e.g. tf.random.normal "
                 "in a layer): no checkpoint holds it, so a resumed run draws other numbers "
                 "than the uninterrupted run would. Draw with keras.random and a "
                 "keras.random.SeedGenerator the layer holds (seed=self.seed_generator).")

    def step_failed(self, name: str, error: BaseException) -> None:
        """A step (or, on torch, its data fetch) raised `error`: listeners, then close."""
        listeners, self._error_listeners = self._error_listeners, []
        for listener in listeners:
            listener(name, error)
        session = self._session()
        if session is not None:
            session.close(error)

    def remove(self) -> None:
        """Puts the original functions back (where nobody wrapped them further since)."""
        model = self._model()
        for name, original, wrapper in reversed(self._installed):
            if model is not None and getattr(model, name, None) is wrapper:
                setattr(model, name, original)
        self._installed = []
        if self._fetch is not None:
            keras_compat.unguard_torch_fetch(self._fetch)
            self._fetch = None
        self.replay = None
        self._result_listeners = []
        self._error_listeners = []
