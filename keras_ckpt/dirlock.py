"""One training run per checkpoint directory: an advisory lock that a crash cannot leave stuck.

The lock is `flock` on a hidden file, `.keras_ckpt.lock`, in the directory.
The kernel releases it when the holding process ends, however it ends, so a
killed run never blocks the next one. The file is removed on a clean release.
Within one process the lock is shared: two `ModelCheckpoint`s of one run may
write into the same directory.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import time

__all__ = ["DirectoryInUseError", "acquire", "release", "LOCK_NAME"]

LOCK_NAME = ".keras_ckpt.lock"

# realpath -> (file descriptor, ids of the holders in this process)
_held: dict[str, tuple[int, set[int]]] = {}


class DirectoryInUseError(RuntimeError):
    """Another process is training into this checkpoint directory."""


def _describe_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
        return f"pid {int(info['pid'])} on {info['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def acquire(directory: str, holder: object) -> None:
    """Takes the directory's lock for `holder` (shared by holders in this process).

    Raises:
        DirectoryInUseError: another process holds it; the message says which.
    """
    key = os.path.realpath(directory)
    if key in _held:
        _held[key][1].add(id(holder))
        return
    path = os.path.join(key, LOCK_NAME)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _describe_holder(fd)
            os.close(fd)
            raise DirectoryInUseError(
                f"The checkpoint directory {key} is in use by another training run ({who}). "
                "Two runs writing one directory would interleave and delete each other's "
                "checkpoints. Give this run its own directory, or stop the other run first (its "
                "lock goes away when it ends, even if it crashes). To share the directory "
                "anyway, pass lock=False."
            ) from None
        except OSError:
            os.close(fd)
            raise
        # The holder before us may have removed the file between our open and
        # our lock: then we hold a lock on a name nobody else sees. Retry.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)
    _held[key] = (fd, {id(holder)})


def release(directory: str, holder: object) -> None:
    """Drops `holder`'s share; the last one out unlocks."""
    key = os.path.realpath(directory)
    entry = _held.get(key)
    if entry is None:
        return
    fd, holders = entry
    holders.discard(id(holder))
    if not holders:
        del _held[key]
        try:
            # Removed while still locked, so the directory is left as Keras
            # would leave it; a crash leaves the file, unlocked and harmless.
            os.remove(os.path.join(key, LOCK_NAME))
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _release_all_at_exit() -> None:
    # A fit that ended in an exception never released its lock; the kernel
    # would at exit, but the file would stay. Leave the directory clean.
    for key in list(_held):
        _held[key][1].clear()
        release(key, None)


atexit.register(_release_all_at_exit)
