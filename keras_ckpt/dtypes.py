"""The array dtypes a checkpoint may hold: NumPy's numbers and ml_dtypes' small floats.

NumPy has no bfloat16 or float8; Keras uses ml_dtypes' (`ml_dtypes.bfloat16`,
`ml_dtypes.float8_e4m3fn`, ...). HDF5 stores them as opaque bytes of their
size (`|V2`, `|V1`), so the index records their name (`"bfloat16"`, where
NumPy dtypes record `dtype.str`, e.g. `"<f4"`) and reading views the bytes
as that dtype again. Keras marks its own bfloat16 datasets in `.weights.h5`
with the attribute `dtype="bfloat16"` (saving_lib's H5Entry) and reads them
back by it: `keras_attrs` gives the same attributes.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

__all__ = ["is_small_float", "allowed", "index_name", "declared", "stored", "as_stored",
           "as_declared", "crc", "keras_attrs"]

_NUMERIC_KINDS = "biuf"  # bool, int, uint, float: nothing that could hold objects


def _small_floats() -> dict[str, np.dtype]:
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - a Keras dependency
        return {}
    found = {}
    for name in dir(ml_dtypes):
        if name.startswith(("bfloat16", "float8_", "float6_", "float4_")):
            try:
                found[name] = np.dtype(getattr(ml_dtypes, name))
            except TypeError:  # pragma: no cover - not a dtype
                continue
    return found


_SMALL_FLOATS = _small_floats()


def is_small_float(dtype: Any) -> bool:
    """Whether `dtype` is one of ml_dtypes' floats (bfloat16, float8_*, ...)."""
    dtype = np.dtype(dtype)
    found = _SMALL_FLOATS.get(dtype.name)  # (None == float64 is True in NumPy)
    return found is not None and found == dtype


def allowed(dtype: np.dtype) -> bool:
    """Whether a checkpoint may hold arrays of `dtype` (numbers only, never objects)."""
    return (dtype.kind in _NUMERIC_KINDS and dtype.fields is None) or is_small_float(dtype)


def index_name(dtype: np.dtype) -> str:
    """How the index records `dtype`: its name for ml_dtypes' floats, else `dtype.str`."""
    return dtype.name if is_small_float(dtype) else dtype.str


def declared(text: Any) -> np.dtype:
    """The dtype an index entry records (`index_name`'s text).

    Raises:
        TypeError, ValueError: not a dtype.
    """
    if isinstance(text, str) and text in _SMALL_FLOATS:
        return _SMALL_FLOATS[text]
    return np.dtype(text)


def stored(dtype: np.dtype) -> np.dtype:
    """The dtype HDF5 gives back for arrays of `dtype` (opaque bytes for ml_dtypes' floats)."""
    return np.dtype(f"V{dtype.itemsize}") if is_small_float(dtype) else dtype


def as_stored(array: np.ndarray) -> np.ndarray:
    """`array` as HDF5 can store it: ml_dtypes' floats as opaque bytes (h5py has no float8)."""
    return array.view(stored(array.dtype)) if is_small_float(array.dtype) else array


def as_declared(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`array` as read from HDF5, viewed as its declared `dtype` (the same bytes)."""
    return array.view(dtype) if is_small_float(dtype) and array.dtype != dtype else array


def crc(array: np.ndarray) -> int:
    """CRC-32 of the array's bytes in C order (any dtype, ml_dtypes' too)."""
    data = np.ascontiguousarray(array)
    return zlib.crc32(data.reshape(-1).view(np.uint8)) if data.size else 0


def keras_attrs(dtype: Any) -> dict[str, str]:
    """The attributes Keras puts on a `.weights.h5` dataset of `dtype` ({} for most)."""
    return {"dtype": "bfloat16"} if np.dtype(dtype).name == "bfloat16" else {}
