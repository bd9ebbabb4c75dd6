"""One fit, one session: what a fit acquired or changed, undone exactly once.

A `FitSession` is created when Keras hands a model to the first keras-ckpt
callback of a `fit` (`set_model`) and is sealed at its first `on_train_begin`.
Everything a fit acquires or changes registers with it:

- the stateful objects whose state rides in the fit's checkpoints (`members`,
  and the model's data helpers);
- the start epoch handed to Keras (`start_at_epoch`; Keras reads it once,
  right after `on_train_begin`, and the session puts the old value back at the
  first epoch and at close);
- the wrappers around `train_function`/`test_function` (`StepGuards`), with
  the replay of a mid-epoch resume plugged into them;
- cleanups (`on_close`: signal handlers, the directory lock, the writer).

`close(error)` runs exactly once however the fit ends: after the last
`on_train_end`, or when an exception leaves any callback hook or any step
(the fit's `CallbackList` hooks are wrapped for that), or when the next fit
on the same model starts. Error listeners (`on_error`) run first, then the
cleanups, newest first; a failing cleanup never stops the others.

The session lives on the model (one attribute, the newest session), never in
a module global; data helpers not yet used by a fit wait, weakly held and in
the order made, until the next fit claims them.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

from keras_ckpt import keras_compat
from keras_ckpt.fit import hidden_state, keras_callbacks
from keras_ckpt.fit.first_trace import build_before_first_trace
from keras_ckpt.fit.step_guards import StepGuards
from keras_ckpt.warn import warn

__all__ = ["FitSession", "session_of", "join", "seal", "track_data"]

_UNSET = object()
_HOOKS = ("on_train_begin", "on_epoch_begin", "on_epoch_end", "on_train_batch_begin",
          "on_train_batch_end", "on_test_begin", "on_test_end", "on_test_batch_begin",
          "on_test_batch_end")

# Data helpers made for a fit that has not begun (a dataset is made before its fit), in the
# order they were made: the next fit to begin claims them.
_unclaimed: dict[int, weakref.ref] = {}


class FitSession:
    """The record of one `fit`: its members, what it changed, and how to undo it."""

    def __init__(self, model: Any, callback_list: Any = None) -> None:
        self._model = weakref.ref(model)
        self.members: list[weakref.ref] = []
        self.sealed = False
        self.closed = False
        self.replay_until = -1  # batch ends below this, in the resumed epoch, are replays
        self.batch_ends = 0  # the fit's train batch ends so far (replays too)
        self.cut_short: int | None = None  # an epoch a stop ended before its last step
        self.initial_epoch: int | None = None
        self.exit_status: int | None = None  # exit after the last on_train_end (preemption)
        self.guards: StepGuards | None = None
        self.adapters: list = []  # Keras's own stateful callbacks (fit/keras_callbacks.py)
        self.before_epoch: list[Callable[[], None]] = []  # run at the next epoch begin
        self.before_batch: list[Callable[[], None]] = []  # ... at the next train batch begin
        self.resumed_mid_epoch: int | None = None
        self.resume_point: tuple[int, int] | None = None  # (epoch, step) a resume starts at
        self.steps_uncounted = False  # the train step does not apply model.optimizer
        self._initial_before: Any = _UNSET
        self._cleanups: list[tuple[str, Callable[[], None]]] = []
        self._error_listeners: list[Callable[[BaseException], None]] = []
        self._callback_list = None if callback_list is None else weakref.ref(callback_list)
        self._wrapped: dict[str, Callable] = {}
        self._lock = threading.RLock()
        if callback_list is not None:
            self._wrap_callback_list(callback_list)

    # ------------------------------------------------------------ members
    @property
    def model(self) -> Any:
        return self._model()

    def add(self, obj: Any) -> None:
        if not any(ref() is obj for ref in self.members):
            self.members.append(weakref.ref(obj))

    def objects(self) -> dict[str, Any]:
        """The stateful objects by stable key: callbacks, then the model's data helpers.

        A callback's key is its `state_key`; a second one with the same key in
        the same fit gets `_1`, a third `_2`, in the order they were passed.
        """
        result: dict[str, Any] = {}
        for obj in [ref() for ref in self.members] + self.adapters:
            if obj is None:
                continue
            key, n = obj.state_key, 0
            while key in result:
                n += 1
                key = f"{obj.state_key}_{n}"
            result[key] = obj
        model = self.model
        for name, obj in (_data_of(model) if model is not None else {}).items():
            result[f"data:{name}"] = obj
        return result

    def callback_list(self) -> Any:
        return None if self._callback_list is None else self._callback_list()

    # ------------------------------------------------------------ start epoch
    def start_at_epoch(self, epoch: int) -> int:
        """Makes this fit start at `epoch` or later (the largest request wins)."""
        model = self.model
        if self.initial_epoch is not None:
            epoch = max(epoch, self.initial_epoch)
        if self._initial_before is _UNSET:
            self._initial_before = keras_compat.get_initial_epoch(model)
        self.initial_epoch = epoch
        keras_compat.set_initial_epoch(model, epoch)
        return epoch

    def release_initial_epoch(self) -> None:
        """Puts back the start epoch Keras had before (Keras has read ours by now)."""
        if self._initial_before is _UNSET:
            return
        model = self.model
        if model is not None and keras_compat.get_initial_epoch(model) == self.initial_epoch:
            keras_compat.set_initial_epoch(model, self._initial_before)
        self._initial_before = _UNSET

    # ------------------------------------------------------------ closing
    def on_close(self, name: str, cleanup: Callable[[], None]) -> None:
        """Runs `cleanup` when the session closes (newest first)."""
        if self.closed:
            cleanup()
            return
        self._cleanups.append((name, cleanup))

    def on_error(self, listener: Callable[[BaseException], None]) -> None:
        """Calls `listener(error)` when the fit ends with `error`, before the cleanups.

        A step's error reaches the step guards' listeners first (the save of
        the state it left), then these (EarlyStopping's restore).
        """
        self._error_listeners.append(listener)

    def close(self, error: BaseException | None = None) -> None:
        """Undoes everything this fit acquired or changed; runs once."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        problems: list[str] = []
        if error is not None:
            for listener in self._error_listeners:
                try:
                    listener(error)
                except Exception as e:  # never hide the original error
                    problems.append(f"{getattr(listener, '__qualname__', listener)}: {e}")
        self._error_listeners.clear()
        if self.guards is not None:
            self.guards.remove()
        self.release_initial_epoch()
        while self._cleanups:
            name, cleanup = self._cleanups.pop()
            try:
                cleanup()
            except Exception as e:
                problems.append(f"{name}: {type(e).__name__}: {e}")
        self._unwrap_callback_list()
        self.adapters, self.before_epoch, self.before_batch = [], [], []  # Keras's let go
        if problems:
            warn("keras-ckpt: closing the fit: " + "; ".join(problems))

    # ------------------------------------------------------------ the fit's hooks
    def _wrap_callback_list(self, callbacks: Any) -> None:
        session = weakref.ref(self)

        def wrap(name: str, original: Callable) -> Callable:
            epoch_begin, batch_end = name == "on_epoch_begin", name == "on_train_batch_end"
            batch_begin = name == "on_train_batch_begin"

            def hook(*args: Any, **kwargs: Any) -> Any:
                if batch_end or batch_begin:
                    live = session()
                    if live is not None and batch_end:
                        live.batch_ends += 1
                    if live is not None and batch_begin and live.before_batch:
                        pending, live.before_batch = live.before_batch, []
                        for apply in pending:
                            apply()
                if epoch_begin:  # Keras has read the start epoch: put the old one back
                    live = session()
                    if live is not None:
                        live.release_initial_epoch()
                        pending, live.before_epoch = live.before_epoch, []
                        for apply in pending:
                            apply()
                try:
                    return original(*args, **kwargs)
                except BaseException as e:
                    live = session()
                    if live is not None:
                        live.close(e)
                    raise
            return hook

        def train_end(*args: Any, _original: Callable = callbacks.on_train_end,
                      **kwargs: Any) -> Any:
            live = session()
            while live is not None and (live.before_epoch or live.before_batch):
                # restored states that no epoch or batch began to take (nothing to train)
                pending = live.before_epoch + live.before_batch
                live.before_epoch, live.before_batch = [], []
                for apply in pending:
                    apply()
            try:
                result = _original(*args, **kwargs)
            except BaseException as e:
                if live is not None:
                    live.close(e)
                raise
            if live is not None:
                live.close()
                model = live.model
                if model is not None:  # no garbage cycle left behind by a stop mid-epoch
                    keras_compat.release_epoch_iterator(model)
                if live.exit_status is not None:
                    raise SystemExit(live.exit_status)
            return result

        for name in _HOOKS:
            hook = wrap(name, getattr(callbacks, name))
            self._wrapped[name] = hook
            keras_compat.set_instance_attr(callbacks, name, hook)
        self._wrapped["on_train_end"] = train_end
        keras_compat.set_instance_attr(callbacks, "on_train_end", train_end)

    def _unwrap_callback_list(self) -> None:
        callbacks = self.callback_list()
        if callbacks is not None:
            for name, hook in self._wrapped.items():
                if callbacks.__dict__.get(name) is hook:
                    del callbacks.__dict__[name]
        self._wrapped = {}

    @property
    def watches_hooks(self) -> bool:
        """Whether this session sees the fit's hooks end (the fit's CallbackList was found)."""
        return bool(self._wrapped)


def session_of(model: Any) -> FitSession | None:
    """The newest session of `model` (open or closed), or None."""
    return keras_compat.get_private(model, "_keras_ckpt_session")


def join(model: Any, obj: Any) -> FitSession:
    """Registers `obj` for `model`'s current fit (from `set_model`).

    Keras calls `set_model` on all of a fit's callbacks before any
    `on_train_begin`; a sealed session, or one of another `CallbackList`,
    means a new fit has started.
    """
    session = session_of(model)
    callbacks = keras_compat.calling_callback_list()
    if (session is None or session.sealed or session.closed
            or (callbacks is not None and session.callback_list() is not callbacks)):
        if session is not None and session.sealed and not session.closed:
            session.close()  # the previous fit ended without telling us
        session = FitSession(model, callbacks)
        keras_compat.set_private(model, "_keras_ckpt_session", session)
    session.add(obj)
    return session


def seal(model: Any) -> FitSession:
    """Marks the members joined so far as the current fit's (at its first `on_train_begin`).

    Every keras-ckpt callback of the fit calls it; the first seals. A closed
    session (hooks called again without a new `set_model`) starts a new one
    with the same members.
    """
    session = session_of(model)
    if session is None or session.closed:
        members = session.members if session is not None else []
        session = FitSession(model)
        session.members = list(members)
        keras_compat.set_private(model, "_keras_ckpt_session", session)
    if not session.sealed:
        session.sealed = True
        build_before_first_trace(model)  # as a resumed fit must (keras_ckpt/fit/first_trace.py)
        _claim_data(model)
        session.guards = StepGuards(model, session)
        session.adapters = keras_callbacks.attach(session) + hidden_state.attach(session)
    return session


# ------------------------------------------------------------ data helpers
def track_data(name: str, obj: Any) -> None:
    """Tracks a data helper under `name`: the next fit to begin claims it for its model."""
    obj._keras_ckpt_name = name
    key = id(obj)
    _unclaimed.pop(key, None)  # (again: now the newest)
    _unclaimed[key] = weakref.ref(obj, lambda _ref, key=key: _unclaimed.pop(key, None))


def _data_of(model: Any) -> dict[str, Any]:
    claimed = keras_compat.get_private(model, "_keras_ckpt_data") or {}
    return {name: obj for name, ref in claimed.items() if (obj := ref()) is not None}


def _claim_data(model: Any) -> None:
    fresh = [obj for ref in list(_unclaimed.values()) if (obj := ref()) is not None]
    _unclaimed.clear()
    if not fresh:
        return
    claimed = dict(keras_compat.get_private(model, "_keras_ckpt_data") or {})
    names = [obj._keras_ckpt_name for obj in fresh]
    for name in sorted({n for n in names if names.count(n) > 1}):
        warn(f"keras-ckpt: {names.count(name)} data helpers named {name!r} were made since "
             "the last fit that claimed any; this fit's checkpoints hold the newest one's "
             "state only, and where the others feed it too they start afresh on resume. Give "
             "each its own name (EpochShuffle(..., name=...)).")
    for obj in fresh:  # in the order made: a newer helper of the same name replaces the older
        claimed[obj._keras_ckpt_name] = weakref.ref(obj)
    keras_compat.set_private(model, "_keras_ckpt_data", claimed)
