"""How much one read may take: this machine's memory, or what a model's state can need.

`storage.read` checks a file's size, an archive member's declared size and the
arrays' declared sizes against a `Limit` before it reads any data.
"""

from __future__ import annotations

import copy
import os

from keras_ckpt import dtypes
from keras_ckpt.storage_format import CorruptCheckpointError

__all__ = ["Limit", "declared_bytes", "memory_limit", "FILE_ALLOWANCE"]

FILE_ALLOWANCE = 64 << 20  # the metadata (history) beside the arrays


def memory_limit() -> int:
    """The largest array a checkpoint may declare: the machine's physical memory."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 1 << 40


class Limit:
    """The most a read may take: this machine's memory, or what a model's state can need."""

    def __init__(self, state_bytes: int | None = None) -> None:
        self.arrays = memory_limit() if state_bytes is None else int(state_bytes)
        self.what = ("this machine's memory" if state_bytes is None else
                     "what the model's state can take (twice its variables)")
        # A file holds Keras's part beside ours, and the metadata (history).
        self.file = None if state_bytes is None else 2 * self.arrays + FILE_ALLOWANCE
        self.member = self.arrays + (0 if state_bytes is None else FILE_ALLOWANCE)

    def within(self, member_bytes: int, what: str) -> Limit:
        """This limit, with an archive member held to at most `member_bytes`."""
        tighter = copy.copy(self)
        if member_bytes < self.member:
            tighter.member, tighter.what = member_bytes, what
        return tighter

    def check_file(self, path: str, size: int, what: str = "the file") -> None:
        if self.file is not None and size > self.file:
            raise CorruptCheckpointError(
                f"{path}: {what} has {size} bytes, more than a checkpoint of the model's "
                f"state can take ({self.file}); refusing to read it.")


def declared_bytes(meta: dict) -> int:
    """What the arrays of a metadata index declare, in bytes (malformed entries count 0)."""
    total = 0
    for entry in meta.get("arrays", {}).values():
        try:
            size = dtypes.declared(entry["dtype"]).itemsize
            for d in entry["shape"]:
                size *= int(d)
        except (KeyError, TypeError, ValueError, AttributeError):
            continue  # refused when the array is read
        total += max(0, size)
    return total
