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
import re
import threading
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

import h5py
import numpy as np

from keras_ckpt import atomic, dtypes
from keras_ckpt.state import Snapshot

__all__ = ["CorruptCheckpointError", "ForeignFileError", "write", "read", "read_meta",
           "is_temporary",
           "FORMAT", "FORMAT_VERSION", "EXTENSIONS"]

FORMAT = "keras-ckpt"
FORMAT_VERSION = 1
GROUP = "keras_ckpt"
ZIP_MEMBER = "keras_ckpt.h5"  # our state beside Keras's archive (Keras wrote its part)
KERAS_WEIGHTS_MEMBER = "model.weights.h5"  # one-pass archives: our state inside it
EXTENSIONS = (".weights.h5", ".keras", ".h5")
_TMP_MARK = atomic.MARK  # also the older writers' names (`.last.tmp-PID-link`)
_DATASET_NAME = re.compile(r"a\d{5,}")
_MAX_META_BYTES = 256 << 20


class CorruptCheckpointError(ValueError):
    """A file is not a valid keras-ckpt checkpoint (partial, damaged or foreign)."""


class ForeignFileError(CorruptCheckpointError):
    """A readable file that keras-ckpt did not write (e.g. a plain Keras checkpoint)."""


def extension(path: str) -> str:
    """The checkpoint extension of `path` (`.weights.h5`, `.keras`, `.h5`) or ''."""
    for ext in EXTENSIONS:
        if path.endswith(ext):
            return ext
    return ""


def is_temporary(name: str) -> bool:
    """Whether a file name is one of our in-progress temporary names."""
    return os.path.basename(name).startswith(".") and _TMP_MARK in name


_crc = dtypes.crc


def _keras_part_crcs(h5: h5py.File) -> dict[str, int]:
    """CRC-32 of every dataset Keras wrote (everything outside our group)."""
    crcs: dict[str, int] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and not name.startswith(GROUP + "/"):
            _check_dataset_storage(h5.filename, name, obj)
            crcs[name] = _crc(np.asarray(obj[()]))

    h5.visititems(visit)
    return crcs


def _check_dataset_storage(path: str, name: str, dataset: h5py.Dataset) -> None:
    """Refuses a dataset whose data would come from outside this file."""
    if dataset.external or dataset.is_virtual:
        raise CorruptCheckpointError(
            f"{path}: dataset {name!r} takes its data from another file; refusing to read it.")


def _memory_limit() -> int:
    """The largest array a checkpoint may declare: the machine's physical memory."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 1 << 40


class _Slice(io.RawIOBase):
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


def _member_window(path: str, archive: zipfile.ZipFile, member: str) -> tuple[int, int] | None:
    """(offset, size) of our stored member inside a `.keras` archive, or None if compressed."""
    info = archive.getinfo(member)
    if info.file_size > _memory_limit():
        raise CorruptCheckpointError(
            f"{path}: the archive member {member} declares {info.file_size} bytes, more than "
            "this machine's memory; refusing to read it.")
    if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
        return None
    archive.fp.seek(info.header_offset)
    header = archive.fp.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CorruptCheckpointError(f"{path}: the archive's local header is damaged.")
    name_len = int.from_bytes(header[26:28], "little")
    extra_len = int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _write_group(h5: h5py.File, snapshot: Snapshot, meta: dict, layout: Any = None,
                 sync_path: str | None = None, compression: str | None = None) -> None:
    """Writes our group (and, with a `keras_layout.Layout`, Keras's datasets) in one pass.

    With `layout`, each variable's data is written once, where Keras's
    `load_weights` looks for it, and our group hard-links to it. Checksums
    come from the arrays in memory, never from reading the file back; with
    `sync_path` they are computed while the data is being fsynced.
    `compression` ("gzip" or "lzf") compresses every non-scalar dataset.
    """

    def dataset(group: h5py.Group, name: str, array: np.ndarray) -> h5py.Dataset:
        array = dtypes.as_stored(array)
        if compression is None or array.ndim == 0:
            return group.create_dataset(name, data=array)
        return group.create_dataset(name, data=array, compression=compression)

    shared: dict[str, h5py.Dataset] = {}
    keras_values: dict[str, np.ndarray] = {}
    if layout is not None:
        for name, attrs in layout.groups:
            group = h5.require_group(name)
            for key, value in attrs.items():
                group.attrs[key] = value
        for entry in layout.entries:
            target = h5[entry.group]
            if entry.array is not None:
                array = np.asarray(snapshot.arrays[entry.array])
                shared[entry.array] = written = dataset(target, entry.key, array)
            else:
                array = entry.value
                written = dataset(target, entry.key, array)
                keras_values[f"{entry.group}/{entry.key}"] = array
            for key, value in dtypes.keras_attrs(array.dtype).items():
                written.attrs[key] = value  # as Keras's H5Entry (bfloat16)
    group = h5.require_group(GROUP)
    arrays_meta: dict[str, dict] = {}
    data = group.create_group("arrays")
    later: list[tuple[dict, np.ndarray]] = []
    for i, (name, value) in enumerate(snapshot.arrays.items()):
        key = f"a{i:05d}"
        if name in shared:
            data[key] = shared[name]  # a hard link: the same data, stored once
        array = value if isinstance(value, np.ndarray) else np.asarray(value)
        if name not in shared:
            dataset(data, key, array)
        entry = {"dataset": key, "shape": list(array.shape),
                 "dtype": dtypes.index_name(array.dtype)}
        arrays_meta[name] = entry
        if isinstance(value, np.ndarray):
            later.append((entry, array))  # already in memory: checksum it later
        else:
            # A value read only here (a variable): one at a time, so the peak
            # host memory stays one variable, not the whole state.
            entry["crc32"] = _crc(array)
    syncing = None
    if sync_path is not None:
        h5.flush()
        syncing = threading.Thread(target=_fsync_path, args=(sync_path,))
        syncing.start()  # the disk works while the CPU checksums
    try:
        for entry, array in later:
            entry["crc32"] = _crc(array)
        keras_crcs = {name: _crc(v) for name, v in keras_values.items()}
    finally:
        if syncing is not None:
            syncing.join()
    extra = {"keras_part_crc32": keras_crcs} if keras_crcs else {}
    full = {**snapshot.meta, **meta, **extra, "arrays": arrays_meta}
    text = json.dumps(full, allow_nan=False, separators=(",", ":"))
    group.attrs["format"] = FORMAT
    group.attrs["format_version"] = FORMAT_VERSION
    group.attrs["meta"] = text
    group.attrs["meta_crc32"] = zlib.crc32(text.encode())


def _fsync_path(path: str, directory: bool = False) -> None:
    atomic.fsync_path(path, directory)  # a seam: the crash harness (demo_train) wraps it


def write(path: str, snapshot: Snapshot, *, keras_writer: Callable[[str], None] | None = None,
          keras_layout: Any = None, keras_archive: tuple[str, str] | None = None,
          meta: dict | None = None, fsync: bool = True, compression: str | None = None) -> int:
    """Writes one checkpoint atomically; returns its size in bytes.

    Args:
        path: the final file name; its extension picks the layout.
        snapshot: the state to store.
        keras_writer: writes Keras's own part to the path it is given (e.g.
            `model.save_weights`); None for a file only keras-ckpt reads.
        keras_layout: for `.weights.h5`, a `keras_layout.Layout`: Keras's
            part is written from the snapshot in the same pass, sharing the
            data (instead of `keras_writer`); with `keras_archive`, the same
            for a `.keras` file.
        keras_archive: for `.keras`, Keras's `(config.json, metadata.json)`
            texts: the archive is written in one pass, our state inside its
            `model.weights.h5` member.
        meta: extra JSON-safe metadata (progress, monitor, time written).
        fsync: flush file and directory to stable storage before returning.
        compression: None (default), "gzip" or "lzf" for keras-ckpt's arrays
            and, in one-pass files, Keras's datasets (smaller files, slower
            writes; Keras reads them as usual).

    Raises:
        OSError: the write failed; the previous file at `path` is untouched and
            no temporary file is left behind.
    """
    ext = extension(os.path.basename(path)) or ".h5"

    def produce(tmp: str) -> int:
        if ext == ".keras" and keras_archive is not None and keras_layout is not None:
            buffer = io.BytesIO()
            with h5py.File(buffer, "w") as h5:
                _write_group(h5, snapshot, meta or {}, layout=keras_layout,
                             compression=compression)
            config_json, metadata_json = keras_archive
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
                archive.writestr("metadata.json", metadata_json)
                archive.writestr("config.json", config_json)
                archive.writestr(KERAS_WEIGHTS_MEMBER, buffer.getbuffer())
            del buffer
        elif ext == ".keras":
            if keras_writer is not None:
                keras_writer(tmp)
            buffer = io.BytesIO()
            with h5py.File(buffer, "w") as h5:
                _write_group(h5, snapshot, meta or {}, compression=compression)
            mode = "a" if keras_writer is not None else "w"
            with zipfile.ZipFile(tmp, mode, compression=zipfile.ZIP_STORED) as archive:
                archive.writestr(ZIP_MEMBER, buffer.getbuffer())
        elif keras_layout is not None:
            with h5py.File(tmp, "w") as h5:
                _write_group(h5, snapshot, meta or {}, layout=keras_layout,
                             sync_path=tmp if fsync else None, compression=compression)
        else:
            if keras_writer is not None:
                keras_writer(tmp)
            with h5py.File(tmp, "a" if keras_writer is not None else "w") as h5:
                if GROUP in h5:
                    del h5[GROUP]
                keras_part = {"keras_part_crc32": _keras_part_crcs(h5)} if keras_writer else {}
                _write_group(h5, snapshot, {**(meta or {}), **keras_part},
                             compression=compression)
        return os.path.getsize(tmp)

    return atomic.write(path, produce, fsync=fsync, suffix=ext, sync=_fsync_path)


@contextlib.contextmanager
def _open_group(path: str, verify: bool = False, fileobj: Any = None):
    raw = None
    try:
        if path.endswith(".keras"):
            with zipfile.ZipFile(fileobj or path) as archive:
                bad = archive.testzip() if verify else None
                if bad is not None:
                    raise CorruptCheckpointError(f"{path}: archive member {bad} fails its CRC.")
                names = archive.namelist()
                member = ZIP_MEMBER if ZIP_MEMBER in names else KERAS_WEIGHTS_MEMBER
                if member not in names:
                    raise ForeignFileError(
                        f"{path} is a Keras archive without keras-ckpt training state.")
                window = _member_window(path, archive, member)
                if window is None:
                    source: Any = io.BytesIO(archive.read(member))
            if window is not None:
                # Read our member in place: no copy of the state into memory.
                raw = None if fileobj else open(path, "rb")  # noqa: SIM115 - closed below
                source = io.BufferedReader(_Slice(fileobj or raw, *window), buffer_size=1 << 20)
            h5 = h5py.File(source, "r")
        else:
            h5 = h5py.File(fileobj or path, "r")
    except CorruptCheckpointError:
        if raw is not None:
            raw.close()
        raise
    except (OSError, zipfile.BadZipFile, zlib.error, ValueError, KeyError) as e:
        if raw is not None:
            raw.close()
        raise CorruptCheckpointError(f"{path} cannot be opened as a checkpoint: {e}") from None
    try:
        with h5:
            group = h5.get(GROUP)
            if not isinstance(group, h5py.Group) or group.attrs.get("format") != FORMAT:
                what = "is a Keras archive without" if path.endswith(".keras") else "holds no"
                raise ForeignFileError(f"{path} {what} keras-ckpt training state.")
            yield group
    finally:
        if raw is not None:
            raw.close()


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


def _parse_meta(path: str, group: h5py.Group) -> dict:
    version = int(group.attrs.get("format_version", -1))
    if version > FORMAT_VERSION or version < 1:
        raise CorruptCheckpointError(
            f"{path} has keras-ckpt format version {version}; this keras-ckpt reads "
            f"version {FORMAT_VERSION} and older. Upgrade keras-ckpt to read it."
        )
    try:
        meta_size = group.attrs.get_id("meta").get_storage_size()
    except (KeyError, OSError):
        raise CorruptCheckpointError(f"{path}: the metadata is missing.") from None
    if meta_size > _MAX_META_BYTES:
        raise CorruptCheckpointError(
            f"{path}: the metadata declares {meta_size} bytes (at most {_MAX_META_BYTES}).")
    text = group.attrs.get("meta")
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    # Damaged bytes come back as surrogates: they fail the checksum, not the encoder.
    if not isinstance(text, str) or zlib.crc32(text.encode("utf-8", "surrogateescape")) != int(
            group.attrs.get("meta_crc32", -1)):
        raise CorruptCheckpointError(f"{path}: the metadata fails its checksum.")
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise CorruptCheckpointError(f"{path}: the metadata is not valid JSON ({e}).") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("arrays"), dict):
        raise CorruptCheckpointError(f"{path}: the metadata lacks the array index.")
    return meta


def read_meta(path: str, fileobj: Any = None) -> dict[str, Any]:
    """Reads a checkpoint's metadata only (cheap: no array is read).

    Args:
        path: the checkpoint; its extension picks the layout.
        fileobj: an open, seekable binary file to read instead of `path` (a
            remote one: only the few blocks holding the metadata are read);
            `path` then names it in errors.

    Raises:
        CorruptCheckpointError: not a readable keras-ckpt checkpoint.
    """
    with _open_group(path, fileobj=fileobj) as group:
        return _parse_meta(path, group)


def read(path: str, verify: bool = True) -> Snapshot:
    """Reads a whole checkpoint, checking every array against its declared shape, dtype and CRC.

    Raises:
        CorruptCheckpointError: partial, damaged, foreign or from a newer format.
    """
    with _open_group(path, verify=verify) as group:
        meta = _parse_meta(path, group)
        if verify:
            _verify_keras_part(path, group, meta)
        data = group.get("arrays")
        arrays: dict[str, np.ndarray] = {}
        limit, total = _memory_limit(), 0
        # Checksums run on a worker thread while the next array is read
        # (zlib and HDF5 both release the GIL).
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1) if verify else None
        checks: list[tuple[str, Any, Any]] = []
        try:
            _read_arrays(path, data, meta.pop("arrays"), arrays, limit, total, pool, checks)
            for name, future, expected in checks:
                if future.result() != expected:
                    raise CorruptCheckpointError(f"{path}: array {name!r} fails its checksum.")
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    return Snapshot(arrays=arrays, meta=meta)


def _read_arrays(path: str, data: Any, index: dict, arrays: dict, limit: int, total: int,
                 pool: Any, checks: list) -> None:
    """Reads and checks each indexed array into `arrays`; queues its checksum on `pool`."""
    for name, entry in index.items():
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
        if total > limit:
            raise CorruptCheckpointError(
                f"{path}: the arrays declare more than {limit} bytes, this machine's "
                "memory; refusing to read them.")
        if not dtypes.allowed(declared) or dataset.dtype != dtypes.stored(declared):
            raise CorruptCheckpointError(
                f"{path}: array {name!r} has dtype {dataset.dtype}, declared {declared}."
            )
        if list(dataset.shape) != shape:
            raise CorruptCheckpointError(
                f"{path}: array {name!r} has shape {dataset.shape}, declared "
                f"{tuple(shape)}."
            )
        if dataset.size and dataset.id.get_storage_size() < dataset.nbytes and (
                dataset.compression is None):
            raise CorruptCheckpointError(f"{path}: array {name!r} is truncated.")
        try:
            array = dataset[()]
        except (OSError, ValueError) as e:
            raise CorruptCheckpointError(f"{path}: array {name!r} cannot be read: {e}.") \
                from None
        array = dtypes.as_declared(np.asarray(array), declared)
        if pool is not None:
            checks.append((name, pool.submit(_crc, array), entry.get("crc32")))
        arrays[name] = array
