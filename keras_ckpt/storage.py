"""One checkpoint on disk: crash-safe writes, verified reads. No pickle, ever.

A checkpoint is one file. Its training state lives in an HDF5 group named
`keras_ckpt`: one dataset per array, and a JSON metadata attribute that lists
every array with its shape, dtype and CRC-32. Where the user asked for a file
Keras can read, Keras writes its own part first (`.weights.h5` and legacy
`.h5`: the same HDF5 file; `.keras`: the zip archive, with our state as one
more member, `keras_ckpt.h5`).

Writes go to a hidden temporary name in the same directory, are flushed and
fsynced, renamed over the final name and the directory is fsynced: until the
rename, the previous checkpoint of that name stays whole, and a partial write
is never listed or loaded.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any

import h5py
import numpy as np

from keras_ckpt.snapshot import Snapshot
from keras_ckpt.storage_archive import (
    Slice,
    archive_meta_text,
    archive_names,
    check_member_crc,
    check_version,
)
from keras_ckpt.storage_arrays import LazyArrays, file_stamp, read_arrays
from keras_ckpt.storage_format import (  # noqa: F401 - the format, as before
    _DATASET_NAME,
    _MAX_META_BYTES,
    _TMP_MARK,
    EXTENSIONS,
    FORMAT,
    FORMAT_VERSION,
    GROUP,
    KERAS_WEIGHTS_MEMBER,
    META_DATASET,
    META_MEMBER,
    ZIP_MEMBER,
    CorruptCheckpointError,
    ForeignFileError,
    NonFiniteStateError,
    _check_dataset_storage,
    _crc,
    _keras_part_crcs,
    extension,
    is_temporary,
)
from keras_ckpt.storage_limits import FILE_ALLOWANCE, Limit, declared_bytes
from keras_ckpt.storage_write import (  # noqa: F401 - the write side, as before
    KerasPartFirst,
    Layout,
    OnePassArchive,
    OnePassWeights,
    _fsync_path,
    _write_group,
    choose_layout,
    write,
)

__all__ = ["CorruptCheckpointError", "ForeignFileError", "NonFiniteStateError", "write", "read",
           "read_lazily", "read_meta", "is_temporary", "extension", "Layout", "OnePassWeights",
           "OnePassArchive", "KerasPartFirst", "choose_layout", "FORMAT", "FORMAT_VERSION",
           "EXTENSIONS"]


def _member_window(path: str, archive: zipfile.ZipFile, member: str,
                   limit: Limit) -> tuple[int, int] | None:
    """(offset, size) of our stored member inside a `.keras` archive, or None if compressed."""
    info = archive.getinfo(member)
    if info.file_size > limit.member:
        raise CorruptCheckpointError(
            f"{path}: the archive member {member} declares {info.file_size} bytes, more than "
            f"{limit.what}; refusing to read it.")
    if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
        return None
    archive.fp.seek(info.header_offset)
    header = archive.fp.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CorruptCheckpointError(f"{path}: the archive's local header is damaged.")
    name_len = int.from_bytes(header[26:28], "little")
    extra_len = int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _hard_child(path: str, parent: h5py.Group, name: str, what: str) -> Any:
    """`parent[name]` if it is there through a hard link (never a soft or external one)."""
    link = parent.get(name, getlink=True)
    if link is None:
        return None
    if not isinstance(link, h5py.HardLink):
        raise CorruptCheckpointError(
            f"{path}: {what} is a link ({type(link).__name__}) to elsewhere; refusing it.")
    return parent.get(name)


@contextlib.contextmanager
def _open_group(path: str, verify: bool = False, fileobj: Any = None,
                limit: Limit | None = None):
    raw, limit = None, limit or Limit()
    try:
        if fileobj is None:
            limit.check_file(path, os.path.getsize(path))
        if path.endswith(".keras"):
            with zipfile.ZipFile(fileobj or path) as archive:
                names = archive_names(path, archive)
                bad = archive.testzip() if verify else None
                if bad is not None:
                    raise CorruptCheckpointError(f"{path}: archive member {bad} fails its CRC.")
                member = ZIP_MEMBER if ZIP_MEMBER in names else KERAS_WEIGHTS_MEMBER
                if member not in names:
                    raise ForeignFileError(
                        f"{path} is a Keras archive without keras-ckpt training state.")
                window = _member_window(path, archive, member, limit)
                if window is None:  # compressed: read whole, its CRC checked by zipfile
                    source: Any = io.BytesIO(archive.read(member))
                elif not verify:
                    check_member_crc(path, archive, member)
            if window is not None:
                # Read our member in place: no copy of the state into memory.
                raw = None if fileobj else open(path, "rb")  # noqa: SIM115 - closed below
                source = io.BufferedReader(Slice(fileobj or raw, *window), buffer_size=1 << 20)
            h5 = h5py.File(source, "r")
        else:
            h5 = h5py.File(fileobj or path, "r")
    except CorruptCheckpointError:
        if raw is not None:
            raw.close()
        raise
    except Exception as e:  # whatever zipfile, zlib or h5py raise on a damaged file
        if raw is not None:
            raw.close()
        raise CorruptCheckpointError(
            f"{path} cannot be opened as a checkpoint: {type(e).__name__}: {e}") from None
    try:
        with h5:
            group = _hard_child(path, h5, GROUP, f"the {GROUP!r} group")
            if not isinstance(group, h5py.Group) or _format_of(path, group) != FORMAT:
                what = "is a Keras archive without" if path.endswith(".keras") else "holds no"
                raise ForeignFileError(f"{path} {what} keras-ckpt training state.")
            yield group
    finally:
        if raw is not None:
            raw.close()


@contextlib.contextmanager
def _one_error(path: str):
    """Any error reading `path` leaves as one `CorruptCheckpointError` naming the file."""
    try:
        yield
    except CorruptCheckpointError:
        raise
    except MemoryError:  # a file declaring more than this process can hold
        raise CorruptCheckpointError(f"{path} declares more data than this process has "
                                     "memory for; refusing it.") from None
    except (zlib.error, zipfile.BadZipFile, EOFError) as e:  # a damaged archive member
        raise CorruptCheckpointError(f"{path}: damaged compressed data ({e}).") from None
    except Exception as e:
        raise CorruptCheckpointError(
            f"{path} cannot be read as a checkpoint: {type(e).__name__}: {e}") from None


def _verify_keras_part(path: str, group: h5py.Group, meta: dict) -> None:
    expected = meta.get("keras_part_crc32")
    if not expected:
        return
    try:
        actual = _keras_part_crcs(group.file)
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: Keras's part cannot be read: {e}.") from None
    for name, crc in expected.items():
        if actual.get(name) != crc:
            raise CorruptCheckpointError(f"{path}: Keras's dataset {name!r} fails its checksum.")


def _is_vlen(group: h5py.Group, name: str) -> bool:
    """Whether attribute `name` holds variable-length data (kept in HDF5's global heap)."""
    dtype = group.attrs.get_id(name).dtype
    info = h5py.check_string_dtype(dtype)
    return (info is not None and info.length is None) or h5py.check_vlen_dtype(dtype) is not None


def _format_of(path: str, group: h5py.Group) -> Any:
    """Our group's `format` attribute, read without HDF5's global heap from format 2 on."""
    if "format" not in group.attrs:
        return None
    version = group.attrs.get("format_version", -1)
    if isinstance(version, (int, np.integer)) and version >= 2 and _is_vlen(group, "format"):
        raise CorruptCheckpointError(f"{path}: the format attribute is not the one keras-ckpt "
                                     "writes; refusing it.")
    value = group.attrs.get("format")
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _meta_text(path: str, group: h5py.Group) -> str:
    """The metadata's text, checked against its CRC-32."""
    version = group.attrs.get("format_version", -1)
    check_version(path, version)
    if version >= 2:
        return _checked(path, group, _meta_dataset_bytes(path, group))
    try:
        meta_size = group.attrs.get_id("meta").get_storage_size()
    except (KeyError, OSError):
        raise CorruptCheckpointError(f"{path}: the metadata is missing.") from None
    unexplained = _bytes_beside_datasets(group.file) if _is_vlen(group, "meta") else 0
    if max(meta_size, unexplained) > _MAX_META_BYTES:
        raise CorruptCheckpointError(
            f"{path}: the metadata may take {max(meta_size, unexplained)} bytes (at most "
            f"{_MAX_META_BYTES}); refusing to read it.")
    return _checked(path, group, group.attrs.get("meta"))  # format 1: a string attribute


def _bytes_beside_datasets(file: h5py.File) -> int:
    """The bytes of `file` that no dataset holds: the most a format-1 string attribute can be.

    HDF5 reports only a variable-length string's descriptor, not its size;
    its data lies in the file beside the datasets.
    """
    stored = 0

    def add(_name: str, obj: Any) -> None:
        nonlocal stored
        if isinstance(obj, h5py.Dataset):
            stored += obj.id.get_storage_size()

    file.visititems(add)  # hard links only: no soft or external link is followed
    return max(0, file.id.get_filesize() - stored)


def _meta_dataset_bytes(path: str, group: h5py.Group) -> bytes:
    data = _hard_child(path, group, META_DATASET, "the metadata")
    if not isinstance(data, h5py.Dataset) or data.dtype != np.uint8 or data.ndim != 1:
        raise CorruptCheckpointError(f"{path}: the metadata is missing.")
    _check_dataset_storage(path, META_DATASET, data)
    if data.size > _MAX_META_BYTES:
        raise CorruptCheckpointError(
            f"{path}: the metadata has {data.size} bytes (at most {_MAX_META_BYTES}).")
    if data.size and data.compression is None and data.id.get_storage_size() < data.size:
        raise CorruptCheckpointError(f"{path}: the metadata is truncated.")
    return data[()].tobytes()


def _checked(path: str, group: h5py.Group, text: Any) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    # Damaged bytes come back as surrogates: they fail the checksum, not the encoder.
    if not isinstance(text, str) or zlib.crc32(text.encode("utf-8", "surrogateescape")) != int(
            group.attrs.get("meta_crc32", -1)):
        raise CorruptCheckpointError(f"{path}: the metadata fails its checksum.")
    return text


def _parse_meta(path: str, text: str) -> dict:
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise CorruptCheckpointError(f"{path}: the metadata is not valid JSON ({e}).") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("arrays"), dict):
        raise CorruptCheckpointError(f"{path}: the metadata lacks the array index.")
    return meta


def read_meta(path: str, fileobj: Any = None, state_bytes: int | None = None) -> dict[str, Any]:
    """Reads a checkpoint's metadata only (cheap: no array is read).

    Args:
        path: the checkpoint; its extension picks the layout.
        fileobj: an open, seekable binary file to read instead of `path` (a
            remote one: only the few blocks holding the metadata are read);
            `path` then names it in errors.
        state_bytes: as for `read`: a file larger than a checkpoint of that
            state can be is refused unread.

    Raises:
        CorruptCheckpointError: not a readable keras-ckpt checkpoint.
    """
    with _one_error(path):
        limit = Limit(state_bytes)
        text = None
        if path.endswith(".keras"):
            if fileobj is None:
                limit.check_file(path, os.path.getsize(path))
            text = archive_meta_text(path, fileobj)
        if text is None:  # (_open_group checks the file's size itself)
            with _open_group(path, fileobj=fileobj, limit=limit) as group:
                text = _meta_text(path, group)
        return _parse_meta(path, text)


def read(path: str, verify: bool = True, state_bytes: int | None = None) -> Snapshot:
    """Reads a whole checkpoint, checking every array against its declared shape, dtype and CRC.

    Args:
        path: the checkpoint.
        verify: check every checksum (Keras's part and the archive's too).
        state_bytes: the most the arrays may take together (for a model,
            `state_checks.state_bytes_bound`); a file, member or declaration
            beyond it is refused before anything is read. None: this
            machine's memory.

    Raises:
        CorruptCheckpointError: partial, damaged, foreign or from a newer format.
    """
    with _one_error(path), _verified(path, verify, Limit(state_bytes), keep=True) as snapshot:
        return snapshot


@contextlib.contextmanager
def read_lazily(path: str, state_bytes: int | None = None) -> Iterator[Snapshot]:
    """`read`, verified whole, whose arrays are read again one by one when asked for.

    Every check and checksum of `read` passes before the `Snapshot` is
    handed over (each array is read, checksummed and let go); its `arrays`
    (`storage_arrays.LazyArrays`) then read each array from the open file
    when asked for, so a restore holds one variable's array at a time. Valid
    inside the `with` block only.

    Raises:
        CorruptCheckpointError: as `read`, on entering.
    """
    stack = contextlib.ExitStack()
    with _one_error(path):
        snapshot = stack.enter_context(_verified(path, True, Limit(state_bytes), keep=False))
    with stack:
        yield snapshot


@contextlib.contextmanager
def _verified(path: str, verify: bool, limit: Limit, keep: bool) -> Iterator[Snapshot]:
    stamp = None if keep else file_stamp(path)
    sidecar = archive_meta_text(path) if path.endswith(".keras") else None
    if sidecar is not None:
        # Our member holds what its own index declares (Keras's datasets share
        # that data), and the metadata: nothing more is inflated.
        limit = limit.within(2 * declared_bytes(_parse_meta(path, sidecar)) + FILE_ALLOWANCE,
                             "what the archive's own index declares")
    with _open_group(path, verify=verify, limit=limit) as group:
        text = _meta_text(path, group)
        if sidecar is not None and sidecar != text:
            raise CorruptCheckpointError(
                f"{path}: the archive's metadata member disagrees with its state.")
        meta = _parse_meta(path, text)
        if verify:
            _verify_keras_part(path, group, meta)
        data = _hard_child(path, group, "arrays", "the arrays group")
        if data is not None and not isinstance(data, h5py.Group):
            raise CorruptCheckpointError(f"{path}: the arrays group is not a group.")
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1) if verify else None
        try:
            arrays, found = read_arrays(path, data, meta.pop("arrays"), limit, pool, keep)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        if stamp is not None and file_stamp(path) != stamp:
            raise CorruptCheckpointError(f"{path} was written while it was being verified.")
        yield Snapshot(arrays=arrays if keep else LazyArrays(path, found, stamp), meta=meta,
                       source=path)
