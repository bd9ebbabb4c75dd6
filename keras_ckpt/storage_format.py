"""The checkpoint file format: its names, limits and errors, and the checksums both sides use."""

from __future__ import annotations

import json
import os
import re
import zlib
from typing import Any

import h5py
import numpy as np

from keras_ckpt import atomic, dtypes

__all__ = ["CorruptCheckpointError", "ForeignFileError", "FORMAT", "FORMAT_VERSION",
           "EXTENSIONS", "GROUP", "ZIP_MEMBER", "KERAS_WEIGHTS_MEMBER", "META_MEMBER", "extension",
           "NonFiniteStateError", "non_finite",
           "is_temporary", "set_meta", "META_DATASET"]

FORMAT = "keras-ckpt"
# 2: the metadata is a uint8 dataset and `format` a fixed-length string, so that no
# read of ours goes through HDF5's global heap (a damaged one made HDF5 loop forever).
# 1 (read still): the metadata was a variable-length string attribute.
FORMAT_VERSION = 2
META_DATASET = "meta"
GROUP = "keras_ckpt"
ZIP_MEMBER = "keras_ckpt.h5"  # our state beside Keras's archive (Keras wrote its part)
KERAS_WEIGHTS_MEMBER = "model.weights.h5"  # one-pass archives: our state inside it
# `.keras`: a copy of the metadata as a small member of its own, so that listing
# an archive reads a few CRC-checked bytes and never parses HDF5 unverified.
META_MEMBER = "keras_ckpt.json"
EXTENSIONS = (".weights.h5", ".keras", ".h5")
_TMP_MARK = atomic.MARK  # also the older writers' names (`.last.tmp-PID-link`)
_DATASET_NAME = re.compile(r"a\d{5,}")
_MAX_META_BYTES = 256 << 20


class CorruptCheckpointError(ValueError):
    """A file is not a valid keras-ckpt checkpoint (partial, damaged or foreign)."""


class NonFiniteStateError(ValueError):
    """A state about to be written holds NaN or infinity in a model or optimizer variable.

    Attributes:
        variable: the variable's path.
    """

    def __init__(self, message: str, variable: str = "") -> None:
        super().__init__(message)
        self.variable = variable


class ForeignFileError(CorruptCheckpointError):
    """A readable file that keras-ckpt did not write (e.g. a plain Keras checkpoint)."""


_crc = dtypes.crc
_CHECKED_GROUPS = ("model/", "optimizer/")


def non_finite(name: str, array: np.ndarray, variables: Any) -> NonFiniteStateError | None:
    """The error for array `name` (`model/00003`, a piece `model/00003/1`) where it is a model
    or optimizer variable holding NaN or infinity (bfloat16 and float8 too), else None."""
    if name.startswith(_CHECKED_GROUPS) and array.dtype.kind in "fVc" and array.size:
        try:
            finite = bool(np.isfinite(array).all())
        except TypeError:  # a dtype without isfinite: nothing to check
            finite = True
        if not finite:
            group, index = name.split("/")[:2]
            try:
                what = variables[group][int(index)]["path"]
            except (KeyError, IndexError, TypeError, ValueError):
                what = name
            return NonFiniteStateError(f"the variable {what} holds NaN or infinite values", what)
    return None


def _crc_finite(name: str, array: np.ndarray, variables: Any) -> int:
    """CRC-32 of `array`; refuses a non-finite model or optimizer variable (same pass)."""
    if (error := non_finite(name, array, variables)) is not None:
        raise error
    return _crc(array)


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


def set_meta(group: h5py.Group, text: str) -> None:
    """Writes our group's `format` and metadata text, with its CRC-32 (format 2)."""
    data = text.encode("utf-8", "surrogateescape")
    if META_DATASET in group:
        del group[META_DATASET]
    if "meta" in group.attrs:  # a format-1 file rewritten
        del group.attrs["meta"]
    group.attrs["format"] = np.bytes_(FORMAT.encode())
    group.attrs["format_version"] = FORMAT_VERSION
    group.create_dataset(META_DATASET, data=np.frombuffer(data, dtype=np.uint8))
    group.attrs["meta_crc32"] = zlib.crc32(data)


def meta_member(text: str) -> str:
    """The `META_MEMBER` of an archive whose metadata is `text`."""
    return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                       "meta_crc32": zlib.crc32(text.encode()), "meta": text},
                      separators=(",", ":"))


def extension(path: str) -> str:
    """The checkpoint extension of `path` (`.weights.h5`, `.keras`, `.h5`) or ''."""
    for ext in EXTENSIONS:
        if path.endswith(ext):
            return ext
    return ""


def is_temporary(name: str) -> bool:
    """Whether a file name is one of our in-progress temporary names."""
    return os.path.basename(name).startswith(".") and _TMP_MARK in name
