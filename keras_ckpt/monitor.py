"""The one comparator that every keras-ckpt callback shares.

`Monitor` decides, for each new value of a monitored quantity, whether it is an
improvement, what the best value so far is and when it came, how many checks
have passed since the last improvement, and whether patience is exhausted. It
works on plain Python floats (no backend ops, no device sync) and its state
round-trips through strict JSON, so that a resumed run decides exactly as the
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from keras_ckpt import metric_direction
from keras_ckpt.jsonsafe import decode_float, encode_float
from keras_ckpt.metric_direction import infer_mode
from keras_ckpt.validation import check_choice, check_number
from keras_ckpt.warn import warn

__all__ = ["Monitor", "Decision", "infer_mode", "keras_mode"]

MODES = ("auto", "min", "max")
MIN_DELTA_MODES = ("absolute", "relative")
_STATE_VERSION = 1


def keras_mode(mode: Any, owner: str) -> str:
    """A callback's `mode` as Keras takes it: an unknown one warns and becomes `"auto"`.

    Keras's monitoring callbacks do not refuse an unknown `mode`; they warn
    (`"<Class> mode '<mode>' is unknown, fallback to auto mode."`) and infer
    the direction. keras-ckpt's drop-ins do the same; `Monitor` itself stays
    strict.

    Args:
        mode: the `mode` argument as passed.
        owner: the callback's class name, for the warning (which points at the
            user's line: `keras_ckpt.warn`).

    Returns:
        `mode` when it is `"auto"`, `"min"` or `"max"`; otherwise `"auto"`.
    """
    if isinstance(mode, str) and mode in MODES:
        return mode
    warn(f"{owner} mode '{mode}' is unknown, fallback to auto mode.")
    return "auto"


@dataclasses.dataclass(frozen=True)
class Decision:
    """What `Monitor.update` concluded about one value.

    Attributes:
        counted: False when the value was ignored (missing, or before
            `start_from_epoch`); then nothing else changed.
        improved: whether the value became the new best.
        best: the best value so far (None before the first finite value).
        best_epoch: the epoch of `best` (None before it).
        wait: checks since the last improvement (Keras's `wait`).
        patience_exhausted: `wait >= patience`.
    """

    counted: bool
    improved: bool
    best: float | None
    best_epoch: int | None
    wait: int
    patience_exhausted: bool


class Monitor:
    """Decides whether a monitored quantity improved, and tracks patience.

    This is the one place where keras-ckpt's comparison rules live; its
    callbacks (`ModelCheckpoint`, `EarlyStopping`, `TerminateOnNaN`) all use
    it. The rules follow Keras's `EarlyStopping` and `ModelCheckpoint`, with
    these differences: NaN and +-Inf are never an improvement (so a first NaN
    cannot poison `best`); `mode="auto"` also knows per-output losses and
    raises at train begin, not after an epoch; `min_delta` can be relative.

    A value `v` improves on a reference `r` when, in `"min"` mode,
    `v + delta < r`, and in `"max"` mode, `v - delta > r`, where `delta` is
    `min_delta` (absolute) or `min_delta * abs(r)` (relative). With no
    reference yet, any finite value improves.

    Args:
        monitor: name of the quantity in the logs, e.g. `"val_loss"`.
        mode: `"auto"`, `"min"` or `"max"`. `"auto"` is resolved by
            `resolve(model)` (see `infer_mode`).
        min_delta: smallest change that counts as an improvement, >= 0.
        patience: checks without improvement after which
            `patience_exhausted` is True, >= 0.
        baseline: if set, `wait` restarts only when a value improves on both
            the best so far and `baseline`; so patience runs out unless the
            quantity beats the baseline. `best` still tracks the best value
            seen, baseline or not (Keras 3 semantics).
        start_from_epoch: values from epochs before this one are ignored.
        min_delta_mode: `"absolute"` (Keras) or `"relative"`: `min_delta` is
            then a fraction of `abs(best)`.
        initial_value_threshold: initial reference: the first value must
            improve on it to become `best` (Keras `ModelCheckpoint`).
        strict: if True, a monitor missing from the logs raises `KeyError`;
            otherwise one warning per fit names the keys available.
        owner: the name used in messages, e.g. the callback's class name.

    Example:
    >>> m = Monitor("val_loss", patience=2)
    >>> m.resolve()
    'min'
    >>> [m.update(v, epoch=e).improved for e, v in enumerate([1.0, 0.5, 0.7, 0.6])]
    [True, True, False, False]
    >>> m.best, m.best_epoch, m.wait, m.patience_exhausted
    (0.5, 1, 2, True)
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: str = "auto",
        min_delta: float = 0.0,
        patience: int = 0,
        baseline: float | None = None,
        start_from_epoch: int = 0,
        min_delta_mode: str = "absolute",
        initial_value_threshold: float | None = None,
        strict: bool = False,
        owner: str = "Monitor",
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"`monitor` must be a non-empty string; got {monitor!r}.")
        check_choice("mode", mode, MODES)
        check_choice("min_delta_mode", min_delta_mode, MIN_DELTA_MODES)
        check_number("min_delta", min_delta, minimum=0)
        check_number("patience", patience, minimum=0, integer=True)
        check_number("start_from_epoch", start_from_epoch, minimum=0, integer=True)
        check_number("baseline", baseline, allow_none=True)
        check_number("initial_value_threshold", initial_value_threshold, allow_none=True)
        self.monitor = monitor
        self.mode = mode
        self.min_delta = float(min_delta)
        self.min_delta_mode = min_delta_mode
        self.patience = int(patience)
        self.baseline = None if baseline is None else float(baseline)
        self.start_from_epoch = int(start_from_epoch)
        self.initial_value_threshold = (
            None if initial_value_threshold is None else float(initial_value_threshold)
        )
        self.strict = bool(strict)
        self.owner = owner
        self.direction: str | None = None if mode == "auto" else mode
        self._warned_missing = False
        self.missing_hint = ""  # what the owner does without the value (said in the warning)
        self.reset()

    # ----------------------------------------------------------------- set-up
    def reset(self) -> None:
        """Forgets every value seen (best, its epoch and step, wait, checks)."""
        self.best: float | None = self.initial_value_threshold
        self.best_epoch: int | None = None
        self.best_step: int | None = None
        self.wait = 0
        self.checks = 0

    def resolve(self, model: Any = None) -> str:
        """Fixes the direction; call at train begin.

        Args:
            model: the compiled model, used by `mode="auto"`.

        Returns:
            `"min"` or `"max"`.

        Raises:
            ValueError: `mode="auto"` and the direction of `monitor` cannot be
                told; the message names the metric and says to pass `mode`.
        """
        self._warned_missing = False
        shape = metric_direction.non_scalar_shape(self.monitor, model)
        if shape is not None:
            raise ValueError(
                f"{self.owner} monitors {self.monitor!r}, which is not a scalar: that metric "
                f"gives one value per class (shape {shape}), and only a scalar can be "
                "compared with the best so far. Monitor a scalar: for F1Score or "
                "FBetaScore compile them with average='macro', 'micro' or 'weighted', or "
                "monitor 'loss'.")
        if self.mode != "auto":
            self.direction = self.mode
            return self.direction
        direction = infer_mode(self.monitor, model)
        if direction is None:
            raise ValueError(
                f"{self.owner} cannot tell whether monitor={self.monitor!r} should be "
                "minimised or maximised (it is not a loss, and Keras does not know the "
                "direction of that metric). Pass mode='min' or mode='max'."
            )
        self.direction = direction
        return direction

    # ------------------------------------------------------------- decisions
    def get_value(self, logs: Mapping[str, Any] | None) -> float | None:
        """Reads the monitored value from `logs` as a Python float (one-element arrays too).

        Returns:
            The value, or None when it is missing (a warning, once per fit,
            lists the available keys).

        Raises:
            KeyError: the value is missing and `strict=True`.
            ValueError: the value is not a scalar (nor an array of one element).
        """
        logs = logs or {}
        value = logs.get(self.monitor)
        if value is None:
            import difflib

            available = ", ".join(sorted(logs)) or "(none)"
            close = difflib.get_close_matches(str(self.monitor), [str(k) for k in logs], n=1)
            message = (
                f"{self.owner} monitors {self.monitor!r}, which is not in the logs. "
                + (f"Did you mean {close[0]!r}? " if close else "")
                + f"Available keys: {available}.{self.missing_hint}"
            )
            if self.strict:
                raise KeyError(message)
            if not self._warned_missing:
                self._warned_missing = True
                warn(message)
            return None
        try:
            # A one-element array (F1Score of one class) is a scalar, as
            # Keras's comparison takes it.
            array = np.asarray(value, dtype=np.float64)
            if array.size != 1:
                raise ValueError(array.shape)
            return float(array.reshape(()))
        except (TypeError, ValueError):
            raise ValueError(
                f"{self.owner} monitors {self.monitor!r}, which must be a scalar; "
                f"got {value!r}."
            ) from None

    def is_improvement(self, value: float | None, reference: float | None) -> bool:
        """Whether `value` improves on `reference` (see the class docstring)."""
        if value is None or not math.isfinite(value):
            return False
        if reference is None:
            return True
        if self.direction is None:
            raise RuntimeError(f"{self.owner}: call resolve() before comparing values.")
        delta = self.min_delta
        if self.min_delta_mode == "relative":
            delta *= abs(reference)
        if self.direction == "min":
            return value + delta < reference
        return value - delta > reference

    @property
    def patience_exhausted(self) -> bool:
        """True when `wait >= patience`."""
        return self.wait >= self.patience

    def update(self, value: float | None, epoch: int, step: int | None = None) -> Decision:
        """Takes one new value and returns the decision.

        Args:
            value: the monitored value (None when missing: ignored).
            epoch: the 0-based epoch it belongs to.
            step: the step within the epoch, for batch-level checks.

        Returns:
            A `Decision`.
        """
        if value is None or epoch < self.start_from_epoch:
            return self._decision(counted=False, improved=False)
        self.wait += 1
        self.checks += 1
        improved = self.is_improvement(value, self.best)
        if improved:
            self.best = float(value)
            self.best_epoch = int(epoch)
            self.best_step = None if step is None else int(step)
            if self.baseline is None or self.is_improvement(value, self.baseline):
                self.wait = 0
        return self._decision(counted=True, improved=improved)

    def _decision(self, counted: bool, improved: bool) -> Decision:
        return Decision(counted, improved, self.best, self.best_epoch, self.wait,
                        self.patience_exhausted)

    # ------------------------------------------------------------------ state
    def get_state(self) -> dict:
        """Returns the comparator's state as strict-JSON values."""
        return {
            "version": _STATE_VERSION,
            "monitor": self.monitor,
            "direction": self.direction,
            "best": encode_float(self.best),
            "best_epoch": self.best_epoch,
            "best_step": self.best_step,
            "wait": self.wait,
            "checks": self.checks,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores a state from `get_state`.

        Raises:
            ValueError: the state is from a newer version, or from a monitor of
                another quantity or direction.
        """
        version = state.get("version")
        if version != _STATE_VERSION:
            raise ValueError(
                f"{self.owner}: comparator state version {version!r} is not supported "
                f"(this keras-ckpt reads version {_STATE_VERSION})."
            )
        if state.get("monitor") != self.monitor:
            raise ValueError(
                f"{self.owner}: the saved state monitors {state.get('monitor')!r}, "
                f"but this one monitors {self.monitor!r}."
            )
        saved = state.get("direction")
        if saved is not None and self.direction is not None and saved != self.direction:
            raise ValueError(
                f"{self.owner}: the saved state minimises/maximises ({saved!r}) "
                f"{self.monitor!r} the other way from this one ({self.direction!r})."
            )
        if self.direction is None:
            self.direction = saved
        self.best = decode_float(state.get("best"))
        self.best_epoch = state.get("best_epoch")
        self.best_step = state.get("best_step")
        self.wait = int(state.get("wait", 0))
        self.checks = int(state.get("checks", 0))

    def __repr__(self) -> str:
        return (
            f"Monitor(monitor={self.monitor!r}, mode={self.mode!r}, "
            f"direction={self.direction!r}, best={self.best!r}, wait={self.wait})"
        )
