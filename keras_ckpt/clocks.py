"""The time BudgetStop charges: the wall clock read once, then only monotonic time added."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["SteadyClock"]


class SteadyClock:
    """POSIX seconds that advance with a monotonic clock, never with the wall clock's jumps.

    `start()` reads the wall clock once (the budget day of each moment is
    found from it); after that the time is that reading plus the monotonic
    time elapsed. A wall clock stepped back or forward meanwhile (NTP, a
    user, a virtual machine resumed) neither refunds nor charges anything,
    and the time never goes backward.

    Args:
        wall: POSIX seconds (default `time.time`).
        monotonic: seconds that never go back (default `time.monotonic`;
            when only `wall` is given, `wall` itself, as a fake clock in a
            test advances both).

    Example:
    >>> clock = SteadyClock()
    >>> clock.start()
    >>> clock() >= clock.started_at
    True
    """

    def __init__(self, wall: Callable[[], float] | None = None,
                 monotonic: Callable[[], float] | None = None) -> None:
        self._wall = wall or time.time
        self._monotonic = monotonic or (time.monotonic if wall is None else wall)
        self._anchor: tuple[float, float] | None = None
        self._last = -float("inf")

    @property
    def started_at(self) -> float:
        """The wall-clock reading the time counts from."""
        if self._anchor is None:
            self.start()
        return self._anchor[0]

    def start(self) -> None:
        """Reads the wall clock: the time continues from it (once per fit)."""
        self._anchor = (float(self._wall()), float(self._monotonic()))
        self._last = self._anchor[0]

    def __call__(self) -> float:
        if self._anchor is None:
            self.start()
        wall, mono = self._anchor
        self._last = max(self._last, wall + float(self._monotonic()) - mono)
        return self._last
