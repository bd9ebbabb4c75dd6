"""Temporary files and atomic writes: one name format, one write helper, one cleaner.

Every file keras-ckpt replaces in place (a checkpoint, the budget ledger, a
download into a remote mirror, an upload) is written under a hidden
temporary name in the same directory, then renamed over the final name:

    .NAME.tmp-PID-TOKEN[-PURPOSE][SUFFIX]

`NAME` is the final file's name, `PID` the writing process, `TOKEN` 16
random hex digits (two writers never collide, even in one process),
`PURPOSE` an optional lower-case word (`pull`, `upload`) and `SUFFIX` an
optional extension kept at the end for writers that go by it (Keras's
`save_weights` wants `.weights.h5`). `parse` reads the format back, and
`stale_temporaries` lists only the temporaries whose writer has died, so a
cleaner never deletes a write still in flight in another process (a run
sharing the directory, a budget ledger updated by another run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import secrets
from collections.abc import Callable
from typing import TypeVar

__all__ = ["Temporary", "temp_name", "temp_path", "parse", "is_temporary", "pid_alive",
           "stale_temporaries", "fsync_path", "write", "write_bytes"]

MARK = ".tmp-"
_PURPOSE = re.compile(r"[a-z][a-z0-9_]*")
_SUFFIX = re.compile(r"(?:\.[A-Za-z0-9_]+)*")
# The token: 16 hex digits; earlier keras-ckpt versions wrote 8 (their
# temporaries, left by a crash, are recognised and cleaned the same way).
_FORMAT = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>[1-9]\d*)-(?P<token>[0-9a-f]{4,16})"
                     r"(?:-(?P<purpose>[a-z][a-z0-9_]*))?(?P<suffix>(?:\.[A-Za-z0-9_]+)*)")

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Temporary:
    """A temporary name, parsed: the final name it stands for and who writes it."""

    name: str
    pid: int
    token: str
    purpose: str = ""
    suffix: str = ""


def temp_name(final_name: str, purpose: str = "", suffix: str = "") -> str:
    """A fresh temporary name (no directory) for the file `final_name`, in this process.

    Args:
        final_name: the name the file gets once complete (a base name).
        purpose: an optional lower-case word, e.g. "pull" or "upload".
        suffix: an extension kept at the end, e.g. ".weights.h5".

    Raises:
        ValueError: `final_name` is empty or has a `/`; `purpose` or `suffix`
            is not of the form above.
    """
    if not final_name or "/" in final_name:
        raise ValueError(f"A temporary name needs a file name without '/'; got {final_name!r}.")
    if purpose and not _PURPOSE.fullmatch(purpose):
        raise ValueError(f"`purpose` must be a lower-case word; got {purpose!r}.")
    if not _SUFFIX.fullmatch(suffix):
        raise ValueError(f"`suffix` must be an extension such as '.keras'; got {suffix!r}.")
    tail = f"-{purpose}" if purpose else ""
    return f".{final_name}{MARK}{os.getpid()}-{secrets.token_hex(8)}{tail}{suffix}"


def temp_path(final_path: str, purpose: str = "", suffix: str = "") -> str:
    """A fresh temporary path beside `final_path` (same directory: the rename stays atomic)."""
    directory, name = os.path.split(os.fspath(final_path))
    return os.path.join(directory, temp_name(name, purpose, suffix))


def parse(name: str) -> Temporary | None:
    """The parts of a temporary name (a path is fine), or None if it is not in our format."""
    match = _FORMAT.fullmatch(os.path.basename(name))
    if match is None:
        return None
    return Temporary(name=match["name"], pid=int(match["pid"]), token=match["token"],
                     purpose=match["purpose"] or "", suffix=match["suffix"])


def is_temporary(name: str) -> bool:
    """Whether `name` (or a path's base name) is a temporary name in our format."""
    return parse(name) is not None


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this machine (one of another user's counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temporaries(directory: str) -> list[str]:
    """The temporary names in `directory` whose writer is dead, sorted; [] if it is unreadable.

    Only names in our format count; a temporary of this process or of any
    live process is a write in flight and is never listed.
    """
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    stale = []
    for name in names:
        parsed = parse(name)
        if parsed is not None and parsed.pid != os.getpid() and not pid_alive(parsed.pid):
            stale.append(name)
    return sorted(stale)


def fsync_path(path: str, directory: bool = False) -> None:
    """Flushes the file (or, with `directory`, the directory listing) `path` to stable storage."""
    fd = os.open(path, os.O_RDONLY if directory else os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(path: str, produce: Callable[[str], T], *, fsync: bool = True, purpose: str = "",
          suffix: str = "", sync: Callable[[str, bool], None] | None = None) -> T:
    """Writes the file `path` atomically: `produce(temporary)`, fsync, rename, fsync the directory.

    Args:
        path: the final file.
        produce: writes the whole file at the temporary path it is given (and
            closes it); what it returns is returned.
        fsync: flush the file and its directory to stable storage.
        purpose: see `temp_name`.
        suffix: see `temp_name`.
        sync: flushes a file (`sync(path, False)`) or a directory (`sync(path,
            True)`); default `fsync_path`.

    Raises:
        Whatever `produce`, the fsync or the rename raises: the previous file
        at `path` is untouched and the temporary file is removed.
    """
    sync = sync or fsync_path
    tmp = temp_path(path, purpose, suffix)
    try:
        result = produce(tmp)
        if fsync:
            sync(tmp, False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    if fsync:
        sync(os.path.dirname(os.path.abspath(path)), True)
    return result


def write_bytes(path: str, data: bytes, *, fsync: bool = True) -> None:
    """Writes `data` as the file `path` atomically (see `write`)."""

    def produce(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    write(path, produce, fsync=fsync)
