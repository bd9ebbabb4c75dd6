"""Retention policies: small objects that each name the checkpoints they keep.

A checkpoint survives if any policy keeps it (and the newest valid checkpoint
always survives). Compose them as a list:
`retention=[KeepLast(3), KeepBest(2), KeepEvery(epochs=10)]`.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Protocol

from keras_ckpt.validation import check_choice, check_number

__all__ = ["RetentionPolicy", "KeepLast", "KeepBest", "KeepEvery"]


class RetentionPolicy(Protocol):
    """Anything with `keep(checkpoints) -> set of paths`."""

    def keep(self, checkpoints: Sequence) -> set[str]: ...


class KeepLast:
    """Keeps the `n` newest checkpoints.

    Args:
        n: how many to keep, >= 1.

    Example:
    >>> KeepLast(3)
    KeepLast(3)
    """

    def __init__(self, n: int) -> None:
        check_number("n", n, minimum=1, integer=True)
        self.n = int(n)

    def keep(self, checkpoints: Sequence) -> set[str]:
        """Returns the paths of the `n` newest of `checkpoints` (ordered oldest first)."""
        return {c.path for c in list(checkpoints)[-self.n:]}

    def __repr__(self) -> str:
        return f"KeepLast({self.n})"


class KeepBest:
    """Keeps the `k` checkpoints with the best monitored value.

    Args:
        k: how many to keep, >= 1.
        monitor: the quantity; by default the one the callback monitors.
        mode: `"min"` or `"max"`; by default the callback's resolved mode.

    Example:
    >>> KeepBest(2, monitor="val_loss", mode="min")
    KeepBest(2, monitor='val_loss', mode='min')
    """

    def __init__(self, k: int, monitor: str | None = None, mode: str | None = None) -> None:
        check_number("k", k, minimum=1, integer=True)
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise TypeError(f"`monitor` must be a metric name such as 'val_loss', or None; "
                            f"got {monitor!r}.")
        if mode is not None:
            check_choice("mode", mode, ("min", "max"))
        self.k, self.monitor, self.mode = int(k), monitor, mode

    def keep(self, checkpoints: Sequence) -> set[str]:
        """Returns the paths of the `k` best of `checkpoints` that recorded a finite value."""
        scored = [c for c in checkpoints
                  if c.monitor == self.monitor and c.monitor_value is not None
                  and c.monitor_value == c.monitor_value and abs(c.monitor_value) != float("inf")]
        scored.sort(key=lambda c: c.monitor_value, reverse=self.mode == "max")
        return {c.path for c in scored[: self.k]}

    def __repr__(self) -> str:
        return f"KeepBest({self.k}, monitor={self.monitor!r}, mode={self.mode!r})"


class KeepEvery:
    """Keeps one checkpoint every `epochs` epochs, or every `interval` of wall time.

    Args:
        epochs: keep checkpoints whose epoch number (1-based) is a multiple of it.
        interval: seconds (or a `timedelta`): keep the first checkpoint written
            in each such window since the first checkpoint.

    Example:
    >>> KeepEvery(epochs=10)
    KeepEvery(epochs=10, interval=None)
    """

    def __init__(self, epochs: int | None = None,
                 interval: float | datetime.timedelta | None = None) -> None:
        if isinstance(interval, datetime.timedelta):
            interval = interval.total_seconds()
        if (epochs is None) == (interval is None):
            raise ValueError("KeepEvery needs exactly one of `epochs` or `interval`.")
        check_number("epochs", epochs, allow_none=True, minimum=1, integer=True)
        check_number("interval", interval, allow_none=True, minimum=0, exclusive=True)
        self.epochs, self.interval = epochs, interval

    def keep(self, checkpoints: Sequence) -> set[str]:
        """Returns the paths of the checkpoints this policy keeps."""
        if self.epochs is not None:
            return {c.path for c in checkpoints
                    if c.epoch_complete and (c.epoch + 1) % self.epochs == 0}
        kept, window = set(), None
        ordered = sorted(checkpoints, key=lambda c: c.written_at)
        for c in ordered:
            slot = int((c.written_at - ordered[0].written_at) // self.interval)
            if slot != window:
                kept.add(c.path)
                window = slot
        return kept

    def __repr__(self) -> str:
        return f"KeepEvery(epochs={self.epochs}, interval={self.interval})"
