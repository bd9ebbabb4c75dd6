"""Preemption signals: catch SIGTERM/SIGINT during `fit` and turn them into a graceful stop.

`SignalCatcher` installs handlers (main thread only) that only record the
signal; the training loop looks at `pending` after each step and stops there.
A second delivery of the same signal while one is pending gives the previous
handler its way (a second Ctrl-C interrupts at once). `restore()` puts the
previous handlers back.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["SignalCatcher", "parse_signals", "exit_status"]


def parse_signals(name: str, value: Iterable[Any]) -> tuple[int, ...]:
    """Signal numbers from names (`"SIGTERM"`) or numbers; errors name the argument."""
    if isinstance(value, (str, int)) or not isinstance(value, Iterable):
        raise TypeError(f"`{name}` must be a list of signals such as ['SIGTERM', 'SIGINT']; "
                        f"got {value!r}.")
    numbers = []
    valid = sorted(s.name for s in signal.Signals)
    for item in value:
        try:
            signum = signal.Signals[item] if isinstance(item, str) else signal.Signals(item)
        except (KeyError, ValueError):
            raise ValueError(f"`{name}` has {item!r}, which is not a signal; valid: "
                             f"{', '.join(valid)}.") from None
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"`{name}` has {signum.name}, which cannot be caught.")
        numbers.append(int(signum))
    if not numbers:
        raise ValueError(f"`{name}` must name at least one signal.")
    return tuple(dict.fromkeys(numbers))


def exit_status(signum: int) -> int:
    """The conventional exit status of a process ended by `signum` (128 + number)."""
    return 128 + int(signum)


class SignalCatcher:
    """Records preemption signals during `fit` instead of dying on them.

    The handler only records the signal number: every action (messages,
    saving, stopping, releasing) happens on the training thread's normal path,
    where the training loop reads `pending`. A second delivery while one is
    pending puts the previous handlers back and hands the signal to them (a
    second Ctrl-C raises `KeyboardInterrupt` at once; the fit's session then
    closes on the normal exception path).

    Args:
        signals: the signal numbers to catch.
    """

    def __init__(self, signals: Sequence[int]) -> None:
        self.signals = tuple(signals)
        self.pending: int | None = None
        self.insisted = False
        self._previous: dict[int, Any] = {}

    def install(self) -> bool:
        """Installs the handlers; returns False (and does nothing) outside the main thread."""
        self.restore()
        self.pending = None
        self.insisted = False
        if threading.current_thread() is not threading.main_thread():
            return False
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)
        return True

    def restore(self) -> None:
        """Puts the previous handlers back (only where ours is still the one installed)."""
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.pending is None:
            self.pending = signum
            return
        # Asked again while stopping: the previous handler decides now.
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.insisted = True
        self.restore()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
