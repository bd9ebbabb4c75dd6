"""Reading a `.keras` archive's parts: a window on a stored member, CRC checks, the metadata member.

Used by `storage`'s reads: nothing here parses HDF5, and every member is found
by its exact name, in an archive that holds no name twice.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from typing import Any

import numpy as np

from keras_ckpt.storage_format import (
    _MAX_META_BYTES,
    FORMAT,
    FORMAT_VERSION,
    META_MEMBER,
    CorruptCheckpointError,
)

__all__ = ["Slice", "archive_names", "check_member_crc", "archive_meta_text", "check_version"]


class Slice(io.RawIOBase):
    """A read-only, seekable window [start, start + size) of an open binary file."""

    def __init__(self, raw: Any, start: int, size: int) -> None:
        super().__init__()
        self._raw, self._start, self._size, self._pos = raw, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self._size - self._pos))
        if n == 0:
            return 0
        self._raw.seek(self._start + self._pos)
        got = self._raw.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got


def archive_names(path: str, archive: zipfile.ZipFile) -> list[str]:
    """The archive's member names; refuses one that holds a name twice."""
    names = archive.namelist()
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise CorruptCheckpointError(
            f"{path}: the archive holds two members named {twice!r}; refusing it.")
    return names


def check_member_crc(path: str, archive: zipfile.ZipFile, member: str) -> None:
    """Reads `member` through, in pieces, so that zipfile checks its CRC-32.

    Damaged HDF5 can make the HDF5 library loop forever: no member is parsed
    before its bytes are known to be the ones written.
    """
    with archive.open(member) as f:
        while f.read(1 << 20):
            pass


def check_version(path: str, version: Any) -> None:
    if not isinstance(version, (int, np.integer)) or isinstance(version, bool) or not (
            1 <= version <= FORMAT_VERSION):
        raise CorruptCheckpointError(
            f"{path} has keras-ckpt format version {version}; this keras-ckpt reads "
            f"version {FORMAT_VERSION} and older. Upgrade keras-ckpt to read it."
        )


def archive_meta_text(path: str, fileobj: Any = None) -> str | None:
    """The metadata text of a `.keras` archive's `META_MEMBER` (CRC-checked), or None."""
    with zipfile.ZipFile(fileobj or path) as archive:
        names = archive_names(path, archive)
        if META_MEMBER not in names:
            return None
        if archive.getinfo(META_MEMBER).file_size > _MAX_META_BYTES:
            raise CorruptCheckpointError(
                f"{path}: the metadata member is larger than {_MAX_META_BYTES} bytes.")
        record = json.loads(archive.read(META_MEMBER))
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{path}: the metadata member is not keras-ckpt's.")
    check_version(path, record.get("format_version"))
    text = record.get("meta")
    if not isinstance(text, str) or zlib.crc32(text.encode("utf-8", "surrogateescape")) != \
            record.get("meta_crc32"):
        raise CorruptCheckpointError(f"{path}: the metadata member fails its checksum.")
    return text
