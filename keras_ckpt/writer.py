"""A background checkpoint writer: one write in flight, errors never lost, committed at exit.

The training thread hands over a job (a function that writes, fsyncs and
renames one checkpoint) and goes on training. A second job waits for the
first to finish instead of being coalesced with it: every save the user asked
for becomes a file (epoch-named files, retention policies and BudgetStop's
"checkpoint at the stop" all count on that), and at most one snapshot is held
in memory. An error in a job is kept and raised in the training thread at the
next `submit`, `wait` or `close`. The worker thread is not a daemon, and an
`atexit` hook waits for it, so a pending write commits before the interpreter
exits.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["BackgroundWriter"]

_live: weakref.WeakSet = weakref.WeakSet()


def _wait_all_at_exit() -> None:
    for writer in list(_live):
        writer.drain()


atexit.register(_wait_all_at_exit)


class BackgroundWriter:
    """Runs checkpoint writes on one worker thread, in order, one at a time."""

    def __init__(self, name: str = "keras-ckpt-writer") -> None:
        self._name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        _live.add(self)

    @property
    def in_flight(self) -> bool:
        """Whether a write was started and not yet waited for."""
        return self._thread is not None

    def submit(self, job: Callable[[], Any]) -> None:
        """Waits for the previous write (raising its error, if any), then starts `job`."""
        self.wait()
        thread = threading.Thread(target=self._run, args=(job,), name=self._name, daemon=False)
        self._thread = thread
        thread.start()

    def _run(self, job: Callable[[], Any]) -> None:
        try:
            job()
        except BaseException as e:  # noqa: BLE001 - handed to the training thread
            with self._lock:
                self._error = e

    def drain(self) -> None:
        """Waits for the write in flight; keeps its error for `wait`."""
        thread = self._thread
        if thread is not None:
            thread.join()
            self._thread = None

    def wait(self) -> None:
        """Waits for the write in flight and raises its error, if it had one."""
        self.drain()
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error
