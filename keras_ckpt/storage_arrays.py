"""A checkpoint's arrays: each checked against its index entry, read whole or when asked.

`read_arrays` checks every indexed array (its name points at one of our own
datasets, stored in this file, with the declared dtype, shape and bytes) and
its CRC-32. Reading everything into memory (`keep=True`) is what `storage.read`
returns. Without it, each array is read, checksummed and let go (at most two in
memory: the one being checksummed and the next one read), and `LazyArrays`
reads each again when it is asked for, from the same open file: a restore then
holds one variable's array at a time, not a copy of the whole state, and
nothing is assigned before every checksum has passed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import h5py
import numpy as np

from keras_ckpt import dtypes
from keras_ckpt.storage_format import (
    _DATASET_NAME,
    CorruptCheckpointError,
    _check_dataset_storage,
    _crc,
)
from keras_ckpt.storage_limits import Limit

__all__ = ["read_arrays", "LazyArrays", "file_stamp"]


def read_arrays(path: str, data: Any, index: dict, limit: Limit, pool: Any,
                keep: bool = True) -> tuple[dict[str, np.ndarray], dict[str, tuple]]:
    """Checks every indexed array of `data`, and its CRC-32 where `pool` is given.

    Returns `(arrays, found)`: the arrays read (empty unless `keep`) and, by
    name, `(dataset, declared dtype)` for reading them later.
    """
    arrays: dict[str, np.ndarray] = {}
    found: dict[str, tuple] = {}
    checks: list[tuple[str, Any, Any]] = []
    total = 0
    for name, entry in index.items():
        dataset, declared, total = _checked_dataset(path, data, name, entry, limit, total)
        array = read_dataset(path, name, dataset, declared)
        found[name] = (dataset, declared)
        if pool is not None:
            if not keep and checks:  # the one before is checked (and let go) first
                _settle(path, checks.pop())
            # Checksums run on a worker thread while the next array is read
            # (zlib and HDF5 both release the GIL).
            checks.append((name, pool.submit(_crc, array), entry.get("crc32")))
        if keep:
            arrays[name] = array
        del array
    for check in checks:
        _settle(path, check)
    return arrays, found


def _settle(path: str, check: tuple[str, Any, Any]) -> None:
    name, future, expected = check
    if future.result() != expected:
        raise CorruptCheckpointError(f"{path}: array {name!r} fails its checksum.")


def _checked_dataset(path: str, data: Any, name: str, entry: Any, limit: Limit,
                     total: int) -> tuple[Any, np.dtype, int]:
    """The dataset array `name` points at, checked against its entry (and the arrays'
    running `total` of bytes against `limit`): `(dataset, declared dtype, new total)`."""
    if not isinstance(entry, dict):
        raise CorruptCheckpointError(f"{path}: array {name!r} has no index entry.")
    dataset_name = str(entry.get("dataset"))
    if not _DATASET_NAME.fullmatch(dataset_name):
        raise CorruptCheckpointError(
            f"{path}: array {name!r} points at {dataset_name!r}, not at one of the "
            "checkpoint's own datasets; refusing it.")
    link = data.get(dataset_name, getlink=True) if data is not None else None
    dataset = data.get(dataset_name) if isinstance(link, h5py.HardLink) else None
    if not isinstance(dataset, h5py.Dataset):
        raise CorruptCheckpointError(f"{path}: array {name!r} is missing.")
    _check_dataset_storage(path, name, dataset)
    try:
        declared = dtypes.declared(entry["dtype"])
        shape = [int(d) for d in entry["shape"]]
    except (KeyError, TypeError, ValueError):
        raise CorruptCheckpointError(
            f"{path}: array {name!r} has a malformed index entry.") from None
    total += dataset.size * dataset.dtype.itemsize
    if total > limit.arrays:
        raise CorruptCheckpointError(
            f"{path}: the arrays declare more than {limit.arrays} bytes, "
            f"{limit.what}; refusing to read them.")
    if not dtypes.allowed(declared) or dataset.dtype != dtypes.stored(declared):
        raise CorruptCheckpointError(
            f"{path}: array {name!r} has dtype {dataset.dtype}, declared {declared}.")
    if list(dataset.shape) != shape:
        raise CorruptCheckpointError(
            f"{path}: array {name!r} has shape {dataset.shape}, declared {tuple(shape)}.")
    if dataset.size and dataset.id.get_storage_size() < dataset.nbytes and (
            dataset.compression is None):
        raise CorruptCheckpointError(f"{path}: array {name!r} is truncated.")
    return dataset, declared, total


def read_dataset(path: str, name: str, dataset: Any, declared: np.dtype) -> np.ndarray:
    try:
        array = dataset[()]
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: array {name!r} cannot be read: {e}.") from None
    return dtypes.as_declared(np.asarray(array), declared)


def file_stamp(path: str) -> tuple[int, int, int, int] | None:
    """What changes when a file is written in place: (inode, size, mtime, ctime); None if gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class LazyArrays(Mapping):
    """A verified checkpoint's arrays, each read from the open file when asked for.

    Valid while the file is open (`storage.read_lazily`). Each access reads
    the array again (a fresh numpy array, the caller's to keep or drop);
    `spec(name)` gives its shape and dtype without reading it. keras-ckpt only
    ever replaces a checkpoint by rename, which leaves the open file as it was
    verified; a file written in place since (another program's `cp` over it)
    is refused at the next access, naming it, instead of handing out
    unverified data.
    """

    def __init__(self, path: str, found: dict[str, tuple], stamp: tuple) -> None:
        self._path, self._found, self._stamp = path, found, stamp

    def __getitem__(self, name: str) -> np.ndarray:
        dataset, declared = self._found[name]
        if not dataset.id.valid:  # a programming error, not a damaged file
            raise RuntimeError(f"{self._path}: array {name!r} asked for after its file closed.")
        now = file_stamp(self._path)  # deleted or renamed over: the open file is as verified
        if now is not None and self._stamp is not None and now[:1] == self._stamp[:1] \
                and now != self._stamp:
            raise CorruptCheckpointError(
                f"{self._path} was written in place after it was verified; refusing its "
                f"array {name!r}. What was being restored from it may be partly assigned: "
                "restore again once nothing else writes the file.")
        return read_dataset(self._path, name, dataset, declared)

    def __contains__(self, name: object) -> bool:
        return name in self._found

    def __iter__(self) -> Iterator[str]:
        return iter(self._found)

    def __len__(self) -> int:
        return len(self._found)

    def spec(self, name: str) -> tuple[list[int], np.dtype]:
        """`(shape, dtype)` of array `name`, from the file's index (no data read)."""
        dataset, declared = self._found[name]
        return [int(d) for d in dataset.shape], declared
