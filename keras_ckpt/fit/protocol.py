"""The stateful-callback protocol: what every keras-ckpt callback shares with its fit."""

from __future__ import annotations

import threading

import keras

from keras_ckpt import multi_worker, registry

__all__ = ["StatefulCallback", "overrides", "keep_default_hooks", "steps_done"]


def steps_done(params: dict | None, batch: int) -> int:
    """Training steps done in the epoch at batch end `batch`.

    With `steps_per_execution=N` Keras reports an execution's last index, also
    for a partial last execution (index 7 of a 6-step epoch): the steps trained
    are capped by the epoch's length when Keras knows it.
    """
    steps = (params or {}).get("steps")
    return batch + 1 if steps is None else min(batch + 1, int(steps))


def overrides(callback: keras.callbacks.Callback, base: type, names: tuple) -> bool:
    """Whether `callback`'s class overrides any of the methods `names` of `base`."""
    cls = type(callback)
    return any(getattr(cls, name) is not getattr(base, name) for name in names)


def keep_default_hooks(callback: keras.callbacks.Callback, base: type, **needed: bool) -> None:
    """Shadows `base`'s hooks not `needed` with Keras's no-op defaults, on this instance.

    Keras dispatches batch hooks on its thread pool (JAX, torch) only while no
    callback overrides them: a hook with nothing to do stays Keras's default.
    A subclass's own override of a hook is never shadowed.
    """
    for name, need in needed.items():
        if not need and not overrides(callback, base, (name,)):
            setattr(callback, name, getattr(keras.callbacks.Callback, name).__get__(callback))


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
    _async_safe = False

    @property
    def async_safe(self) -> bool:
        """Whether Keras may run the batch hooks on its thread pool: as the subclass set it,
        never with several JAX processes (each must take every stop at the same step, and
        the collectives that agree on it run in the same order: on the training thread)."""
        return self._async_safe and not multi_worker.several_jax_processes()

    @async_safe.setter
    def async_safe(self, value: bool) -> None:
        self._async_safe = bool(value)

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
        self._fit_session = registry.seal(self.model)
        self._train_thread = threading.get_ident()

    @property
    def fit_session(self):
        """The current fit's `FitSession` (None before the first `on_train_begin`)."""
        return getattr(self, "_fit_session", None)

    def on_training_thread(self) -> bool:
        """Whether this hook runs on fit's own thread (not Keras's callback pool)."""
        return self._train_thread is None or threading.get_ident() == self._train_thread

    def replaying(self, batch: int) -> bool:
        """Whether batch end `batch` is a resume's replay of a step trained before.

        Cheap and safe on Keras's callback thread: it reads the fit's record,
        not `self.model` (which, on JAX, would sync the training state).
        """
        session = getattr(self, "_fit_session", None)
        return session is not None and batch < session.replay_until

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
