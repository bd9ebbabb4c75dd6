"""Which shard files a directory's checkpoints record: the listing's check that none is
missing, the files retention deletes with a checkpoint, and the orphans a train begin removes.

A checkpoint of variables split across JAX processes (`keras_ckpt/shards.py`) records its
shard files by base name in its table; a file is data from a stranger, so a malformed table
is a damaged checkpoint, and nothing a table names outside its own directory is touched.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

from keras_ckpt import storage
from keras_ckpt.shards import SHARD_NAME

__all__ = ["check_present", "files_of", "remove_files", "orphans"]


def check_present(path: str, meta: Mapping[str, Any]) -> None:
    """Raises `CorruptCheckpointError` if a shard file the checkpoint `path` records is
    missing (a listing's check: the files' contents are verified when read)."""
    table = meta.get("shards")
    if table is None:
        return
    names = _names(table)
    if names is None:
        raise storage.CorruptCheckpointError(
            f"{path}: its table of split variables is malformed.")
    for name in (os.path.join(os.path.dirname(path), n) for n in names):
        if not os.path.isfile(name):
            raise storage.CorruptCheckpointError(f"{path}: its shard file {name} is missing.")


def _names(table: Any) -> list[str] | None:
    """The shard file names a table records (base names), None if it is malformed."""
    files = table.get("files") if isinstance(table, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(
            f.get("name"), str) and SHARD_NAME.fullmatch(f["name"]) for f in files):
        return None
    return [f["name"] for f in files]


def _table_names(path: str) -> list[str] | None:
    """The shard file names the file `path` records ([] none); None if it cannot be read."""
    try:
        table = storage.read_meta(path).get("shards")
    except (storage.CorruptCheckpointError, OSError, AttributeError):
        return None
    return [] if table is None else _names(table)


def _recorded(path: str) -> list[str] | None:
    """The shard files named after the checkpoint `path` that it records (paths); None if it
    cannot be read."""
    names = _table_names(path)
    if names is None:
        return None
    return [os.path.join(os.path.dirname(path), n) for n in names
            if SHARD_NAME.fullmatch(n).group("main") == os.path.basename(path)]


def files_of(path: str) -> list[str]:
    """The shard files a checkpoint records (paths), [] if none or unreadable."""
    return _recorded(path) or []


def remove_files(paths: list[str]) -> None:
    """Removes each file (one already gone is fine)."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def orphans(directory: str) -> list[str]:
    """Shard files in `directory` that no checkpoint there records (a save that never
    committed, or a checkpoint replaced or deleted by a process that then died). Those that a
    readable file there records (a checkpoint renamed, too) are kept, and so are those of a
    checkpoint that cannot be read, as the damaged checkpoint itself is."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    names = sorted(n for n in entries if SHARD_NAME.fullmatch(n))
    if not names:
        return []
    kept: set[str] = set()
    for entry in entries:
        path = os.path.join(directory, entry)
        if entry in names or not os.path.isfile(path):
            continue
        recorded = _table_names(path)
        kept |= set(recorded or [])
        if recorded is None:  # its own, by name (a damaged checkpoint's)
            kept |= {n for n in names if SHARD_NAME.fullmatch(n).group("main") == entry}
    return [os.path.join(directory, n) for n in names if n not in kept]
