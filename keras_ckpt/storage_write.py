"""Writing one checkpoint: crash-safe, in one of three layouts (`Layout` strategies).

Writes go to a hidden temporary name in the same directory (`atomic.write`),
are flushed and fsynced, renamed over the final name and the directory is
fsynced: until the rename, the previous checkpoint of that name stays whole,
and a partial write is never listed or loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import h5py
import numpy as np

from keras_ckpt import atomic, dtypes
from keras_ckpt.snapshot import Snapshot
from keras_ckpt.storage_format import (
    GROUP,
    KERAS_WEIGHTS_MEMBER,
    META_MEMBER,
    ZIP_MEMBER,
    _crc,
    _crc_finite,
    _keras_part_crcs,
    extension,
    meta_member,
    set_meta,
)

__all__ = ["write", "Layout", "OnePassWeights", "OnePassArchive", "KerasPartFirst",
           "choose_layout"]




def _write_group(h5: h5py.File, snapshot: Snapshot, meta: dict, layout: Any = None,
                 sync_path: str | None = None, compression: str | None = None) -> str:
    """Writes our group (and, with a `keras_layout.Layout`, Keras's datasets) in one pass.

    Returns the metadata's JSON text.

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
    variables = snapshot.meta.get("variables", {})
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
            later.append((name, entry, array))  # already in memory: checksum it later
        else:
            # A value read only here (a variable): one at a time, so the peak
            # host memory stays one variable, not the whole state.
            entry["crc32"] = _crc_finite(name, array, variables)
    syncing = None
    if sync_path is not None:
        h5.flush()
        syncing = threading.Thread(target=_fsync_path, args=(sync_path,))
        syncing.start()  # the disk works while the CPU checksums
    try:
        for name, entry, array in later:
            entry["crc32"] = _crc_finite(name, array, variables)
        keras_crcs = {name: _crc(v) for name, v in keras_values.items()}
    finally:
        if syncing is not None:
            syncing.join()
    extra = {"keras_part_crc32": keras_crcs} if keras_crcs else {}
    full = {**snapshot.meta, **meta, **extra, "arrays": arrays_meta}
    text = json.dumps(full, allow_nan=False, separators=(",", ":"))
    set_meta(group, text)
    return text


@contextlib.contextmanager
def _h5_file(path: str, mode: str) -> Iterator[h5py.File]:
    """An HDF5 file written through a Python file object.

    A write that fails (a full disk, a quota) is then an `OSError` from
    Python's own I/O: h5py's native writer can fail at close instead, with a
    `RuntimeError`, or leave the HDF5 library in a state that crashes the
    process later.
    """
    with open(path, "r+b" if mode == "a" else "w+b") as f, h5py.File(f, mode) as h5:
        yield h5


@contextlib.contextmanager
def _hdf5_member(tmp: str) -> Iterator[str]:
    """A temporary HDF5 file beside `tmp`, for an archive member, removed afterwards.

    The member's HDF5 is written to disk and streamed into the archive in
    chunks (`ZipFile.write`), not built in memory: a `.keras` save then holds
    no copy of the state (an in-memory buffer was one, and more while it grew).
    A crash leaves it as a temporary of this process, which the next fit removes.
    """
    part = os.path.join(os.path.dirname(tmp) or ".", atomic.temp_name("weights", "part", ".h5"))
    try:
        yield part
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(part)


def _add_meta_member(archive: zipfile.ZipFile, text: str) -> None:
    """The metadata's copy that listing reads (`storage.read_meta`), compressed: it is JSON."""
    archive.writestr(META_MEMBER, meta_member(text), compress_type=zipfile.ZIP_DEFLATED)


def _fsync_path(path: str, directory: bool = False) -> None:
    atomic.fsync_path(path, directory)  # a seam: the crash harness (demo_train) wraps it


class Layout:
    """How one checkpoint file is laid out: a strategy `write` follows.

    Attributes:
        reads_model: it reads the live model (Keras's own writer), so it
            cannot run beside training on the background writer.
    """

    reads_model = False

    def produce(self, tmp: str, ext: str, snapshot: Snapshot, meta: dict,
                compression: str | None, fsync: bool) -> None:  # pragma: no cover
        raise NotImplementedError


class OnePassWeights(Layout):
    """`.weights.h5`: Keras's datasets and our state in one HDF5 pass, the data shared."""

    def __init__(self, keras_layout: Any) -> None:
        self.keras_layout = keras_layout

    def produce(self, tmp, ext, snapshot, meta, compression, fsync):
        with _h5_file(tmp, "w") as h5:
            _write_group(h5, snapshot, meta, layout=self.keras_layout,
                         sync_path=tmp if fsync else None, compression=compression)


class OnePassArchive(Layout):
    """`.keras`: Keras's config, metadata and `model.weights.h5` (our state inside), one pass."""

    def __init__(self, keras_layout: Any, archive: tuple[str, str]) -> None:
        self.keras_layout, self.archive = keras_layout, archive

    def produce(self, tmp, ext, snapshot, meta, compression, fsync):
        config_json, metadata_json = self.archive
        with _hdf5_member(tmp) as part:
            with _h5_file(part, "w") as h5:
                text = _write_group(h5, snapshot, meta, layout=self.keras_layout,
                                    compression=compression)
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
                archive.writestr("metadata.json", metadata_json)
                archive.writestr("config.json", config_json)
                archive.write(part, KERAS_WEIGHTS_MEMBER)
                _add_meta_member(archive, text)


class KerasPartFirst(Layout):
    """Keras writes its part (`keras_writer(tmp)`: `save_weights` / `save`), then ours is added.

    With no `keras_writer`, a file only keras-ckpt reads.
    """

    def __init__(self, keras_writer: Callable[[str], None] | None = None) -> None:
        self.keras_writer = keras_writer
        self.reads_model = keras_writer is not None

    def produce(self, tmp, ext, snapshot, meta, compression, fsync):
        writer = self.keras_writer
        if writer is not None:
            writer(tmp)
        if ext == ".keras":
            with _hdf5_member(tmp) as part:
                with _h5_file(part, "w") as h5:
                    text = _write_group(h5, snapshot, meta, compression=compression)
                with zipfile.ZipFile(tmp, "a" if writer else "w",
                                     compression=zipfile.ZIP_STORED) as archive:
                    archive.write(part, ZIP_MEMBER)
                    _add_meta_member(archive, text)
            return
        with _h5_file(tmp, "a" if writer is not None else "w") as h5:
            if GROUP in h5:
                del h5[GROUP]
            keras_part = {"keras_part_crc32": _keras_part_crcs(h5)} if writer else {}
            _write_group(h5, snapshot, {**meta, **keras_part}, compression=compression)


def write(path: str, snapshot: Snapshot, *, layout: Layout | None = None,
          keras_writer: Callable[[str], None] | None = None, keras_layout: Any = None,
          keras_archive: tuple[str, str] | None = None, meta: dict | None = None,
          fsync: bool = True, compression: str | None = None) -> int:
    """Writes one checkpoint atomically; returns its size in bytes.

    Args:
        path: the final file name; its extension picks the format.
        snapshot: the state to store.
        layout: the `Layout` strategy (`OnePassWeights`, `OnePassArchive`,
            `KerasPartFirst`); by default chosen from the three below.
        keras_writer: writes Keras's own part to the path it is given (e.g.
            `model.save_weights`); None for a file only keras-ckpt reads.
        keras_layout: a `keras_layout.Layout`: Keras's part is written from
            the snapshot in the same pass (`.weights.h5`; with
            `keras_archive`, `.keras`), sharing the data.
        keras_archive: for `.keras`, Keras's `(config.json, metadata.json)`.
        meta: extra JSON-safe metadata (progress, monitor, time written).
        fsync: flush file and directory to stable storage before returning.
        compression: None (default), "gzip" or "lzf" for the arrays (and
            Keras's datasets in one-pass files; Keras reads them as usual).

    Raises:
        OSError: the write failed; the previous file at `path` is untouched and
            no temporary file is left behind.
    """
    ext = extension(os.path.basename(path)) or ".h5"
    if layout is None:
        layout = choose_layout(ext, keras_writer, keras_layout, keras_archive)

    def produce(tmp: str) -> int:
        layout.produce(tmp, ext, snapshot, meta or {}, compression, fsync)
        return os.path.getsize(tmp)

    return atomic.write(path, produce, fsync=fsync, suffix=ext, sync=_fsync_path)


def choose_layout(ext: str, keras_writer: Callable[[str], None] | None = None,
                  keras_layout: Any = None,
                  keras_archive: tuple[str, str] | None = None) -> Layout:
    """The `Layout` for a file of extension `ext` from what is available."""
    if ext == ".keras" and keras_archive is not None and keras_layout is not None:
        return OnePassArchive(keras_layout, keras_archive)
    if ext != ".keras" and keras_layout is not None:
        return OnePassWeights(keras_layout)
    return KerasPartFirst(keras_writer)


