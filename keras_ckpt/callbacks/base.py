"""What every keras-ckpt callback shares: the stateful protocol, Keras-style messages."""

from __future__ import annotations

import math
from collections.abc import Callable

import keras

from keras_ckpt.fit.protocol import StatefulCallback
from keras_ckpt.keras_compat import print_msg

__all__ = ["StatefulCallback", "MonitorAttributes", "print_msg", "non_finite_logs"]


class MonitorAttributes:
    """Keras's `MonitorCallback` attributes, read from and written to the callback's `Monitor`.

    Mixed into `EarlyStopping` and `ModelCheckpoint`, whose comparator is
    `self._monitor` (a `keras_ckpt.monitor.Monitor`), so that code written
    against Keras's callbacks reads and sets the same names.

    Attributes:
        best: the best monitored value so far (None before the first); may be
            set, e.g. to start from a known value.
        monitor_op: Keras's comparison: `keras.ops.less` when the quantity is
            minimised, `keras.ops.greater` when maximised, None until the
            direction is known (at train begin with `mode="auto"`). Read-only:
            the direction comes from `mode`.
    """

    _monitor: object

    @property
    def best(self) -> float | None:
        """The best monitored value so far (None before the first)."""
        return self._monitor.best

    @best.setter
    def best(self, value: float | None) -> None:
        self._monitor.best = None if value is None else float(value)

    @property
    def monitor_op(self) -> Callable | None:
        """`keras.ops.less` (minimise), `keras.ops.greater` (maximise), or None (not known yet)."""
        return {"min": keras.ops.less, "max": keras.ops.greater}.get(self._monitor.direction)

    def _set_monitor_op(self) -> None:
        """Keras's name for fixing the direction: from `mode`, or the model's metrics."""
        self._monitor.resolve(self.model)


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
