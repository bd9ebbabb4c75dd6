"""ModelCheckpoint's arguments: checked once, at construction, into one `Options`.

Every error names the argument and what would be valid. `Options.config()`
is what `ModelCheckpoint.get_config()` returns, and
`ModelCheckpoint(**config)` builds an equal callback.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

from keras_ckpt import storage
from keras_ckpt.monitor import keras_mode
from keras_ckpt.preemption import parse_signals
from keras_ckpt.validation import check_bool, check_choice, check_number

__all__ = ["Options", "parse_options"]

# Arguments of tf.keras's ModelCheckpoint that Keras 3 dropped, and what replaced them.
_LEGACY = {"period": "save_freq (an integer number of steps, or 'epoch')",
           "load_weights_on_restart": "resume=True", "options": "none (not needed)"}


@dataclasses.dataclass(frozen=True)
class Options:
    """ModelCheckpoint's checked arguments (see its docstring for each)."""

    filepath: str
    monitor: str
    verbose: int
    save_best_only: bool
    save_weights_only: bool
    mode: str
    save_freq: str | int
    save_overhead: float | None
    initial_value_threshold: float | None
    resume: bool | str
    retention: tuple
    save_interval: float | None
    save_last: bool
    clock: Callable[[], float] | None
    fsync: bool
    preemption: str | None
    preemption_signals: tuple[str, ...]
    save_on_exception: bool
    on_save_error: str
    if_none_valid: str
    lock: bool
    async_write: bool
    compression: str | None

    @property
    def signal_numbers(self) -> tuple[int, ...]:
        return tuple(int(signal.Signals[name]) for name in self.preemption_signals)

    @property
    def now(self) -> Callable[[], float]:
        return self.clock or time.monotonic

    def config(self, filepath: str) -> dict:
        """The constructor arguments, as Keras callbacks report them."""
        config = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("retention", "clock")}
        config["filepath"] = filepath
        config["preemption_signals"] = list(self.preemption_signals)
        return config


def legacy_argument_error(kwargs: dict) -> TypeError:
    """The error for arguments ModelCheckpoint does not take, naming replacements."""
    name = next(iter(kwargs))
    hint = _LEGACY.get(name)
    if hint is not None:
        return TypeError(f"ModelCheckpoint() got the argument `{name}`, which Keras 3 removed; "
                         f"use {hint}.")
    return TypeError(f"ModelCheckpoint() got an unexpected keyword argument {name!r}.")


def parse_options(filepath: str, *, owner: str = "ModelCheckpoint", monitor: Any,
                  verbose: Any, save_best_only: Any, save_weights_only: Any, mode: Any,
                  save_freq: Any, save_overhead: Any,
                  initial_value_threshold: Any, resume: Any, retention: Sequence[Any] | None,
                  save_interval: Any, save_last: Any, clock: Any, fsync: Any, preemption: Any,
                  preemption_signals: Any, save_on_exception: Any, on_save_error: Any,
                  if_none_valid: Any, lock: Any, async_write: Any, compression: Any) -> Options:
    """Checks every argument; `filepath` is the local path (a URL's mirror already chosen).

    An unknown `mode` warns and becomes `"auto"`, as in Keras (`owner` names
    the callback's class in the warning).
    """
    ext = storage.extension(filepath)
    if save_weights_only and ext != ".weights.h5":
        raise ValueError(
            "With `save_weights_only=True`, `filepath` must end in `.weights.h5` (the "
            f"Keras weights format); got filepath={filepath!r}.")
    if not save_weights_only and ext not in (".keras", ".h5"):
        raise ValueError(
            "`filepath` must end in `.keras` (the Keras model format), or in "
            f"`.weights.h5` with save_weights_only=True; got filepath={filepath!r}.")
    if save_freq not in ("epoch", "auto"):
        if isinstance(save_freq, str):
            # Keras's words first: code may match on them.
            raise ValueError(f"Unrecognized save_freq: {save_freq!r}. `save_freq` must be "
                             "'epoch', 'auto' or a positive integer.")
        check_number("save_freq", save_freq, minimum=1, integer=True)
    if save_overhead is not None:
        if save_freq != "auto":
            raise ValueError("`save_overhead` chooses how often save_freq='auto' saves; got "
                             f"save_overhead={save_overhead!r} with save_freq={save_freq!r}.")
        check_number("save_overhead", save_overhead, minimum=0, exclusive=True)
        if save_overhead >= 1:
            raise ValueError("`save_overhead` is a share of training time, between 0 and 1 "
                             f"(0.02: 2%); got {save_overhead!r}.")
    if isinstance(save_interval, datetime.timedelta):
        save_interval = save_interval.total_seconds()
    check_number("save_interval", save_interval, allow_none=True, minimum=0, exclusive=True)
    if not isinstance(resume, (bool, str, os.PathLike)):
        raise TypeError(f"`resume` must be True, False or a checkpoint path; got {resume!r}.")
    if not isinstance(resume, bool):
        resume = os.fspath(resume)
        if not os.path.isfile(resume):
            raise FileNotFoundError(f"`resume` names {resume!r}, which is not a file.")
    for policy in retention or []:
        if not callable(getattr(policy, "keep", None)):
            raise TypeError(
                "`retention` must be a list of policies such as KeepLast(3), KeepBest(2) "
                f"or KeepEvery(epochs=10); got {policy!r}.")
    if clock is not None and not callable(clock):
        raise TypeError(f"`clock` must be a function returning seconds; got {clock!r}.")
    if not isinstance(monitor, str) or not monitor:
        raise TypeError(f"`monitor` must be a metric name such as 'val_loss'; got {monitor!r}.")
    check_number("verbose", verbose, minimum=0, integer=True)
    for name, value in (("save_best_only", save_best_only),
                        ("save_weights_only", save_weights_only), ("save_last", save_last),
                        ("fsync", fsync), ("save_on_exception", save_on_exception),
                        ("lock", lock), ("async_write", async_write)):
        check_bool(name, value)
    check_choice("preemption", preemption, ("auto", "exit", "return", None))
    signals = parse_signals("preemption_signals", preemption_signals)
    check_choice("on_save_error", on_save_error, ("warn", "raise"))
    check_choice("if_none_valid", if_none_valid, ("raise", "start_fresh"))
    check_choice("compression", compression, (None, "gzip", "lzf"))
    mode = keras_mode(mode, owner)
    if preemption == "auto":
        preemption = "exit" if resume else None
    return Options(
        filepath=filepath, monitor=monitor, verbose=verbose,
        save_best_only=bool(save_best_only), save_weights_only=bool(save_weights_only),
        mode=mode, save_freq=save_freq,
        save_overhead=None if save_overhead is None else float(save_overhead),
        initial_value_threshold=initial_value_threshold,
        resume=resume, retention=tuple(retention or ()), save_interval=save_interval,
        save_last=bool(save_last), clock=clock, fsync=bool(fsync), preemption=preemption,
        preemption_signals=tuple(signal.Signals(n).name for n in signals),
        save_on_exception=bool(save_on_exception), on_save_error=on_save_error,
        if_none_valid=if_none_valid, lock=bool(lock), async_write=bool(async_write),
        compression=compression)
