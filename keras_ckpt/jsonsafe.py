"""Exact, strict-JSON encoding of the values a training state holds.

Python's `json` writes non-finite floats as the non-standard tokens `NaN` and
`Infinity`; other readers reject them. Every float that keras-ckpt puts into
JSON goes through `encode_float`, which keeps finite floats as they are (their
`repr` round-trips exactly) and writes the three non-finite values as strings.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["encode_float", "decode_float", "to_json_value", "encode_log", "decode_log"]

_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def encode_float(value: float | None) -> float | str | None:
    """Returns `value` as a strict-JSON value: a float, `"inf"`, `"-inf"`, `"nan"` or None."""
    if value is None:
        return None
    value = float(value)
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "nan"
    return "inf" if value > 0 else "-inf"


def decode_float(value: float | int | str | None) -> float | None:
    """Inverse of `encode_float`.

    Raises:
        ValueError: if `value` is a string other than the three non-finite names.
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return _NON_FINITE[value]
        except KeyError:
            raise ValueError(
                f"Expected a number, 'inf', '-inf' or 'nan'; got {value!r}."
            ) from None
    return float(value)


def to_json_value(value: Any) -> Any:
    """Recursively makes `value` strict-JSON safe (floats encoded, numpy scalars unwrapped)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return encode_float(value)
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return to_json_value(value.item())
    raise TypeError(
        f"Cannot store a value of type {type(value).__name__} as JSON; "
        "use numbers, strings, booleans, None, lists and dicts."
    )


def encode_log(value: Any) -> Any:
    """A logged value as strict JSON: a float, an array of floats, or (anything else) its text.

    Keras keeps scalar logs as Python floats and vector-valued ones (e.g.
    `F1Score(average=None)`) as numpy arrays; both come back exactly.
    """
    import numpy as np

    try:
        return encode_float(float(value))
    except (TypeError, ValueError):
        pass
    try:
        array = np.asarray(value)
        if array.dtype.kind in "fiu":
            return {"array": [encode_float(float(v)) for v in array.reshape(-1)],
                    "shape": list(array.shape), "dtype": str(array.dtype)}
    except (TypeError, ValueError):
        pass
    return {"text": str(value)}


def decode_log(value: Any) -> Any:
    """Reverses `encode_log`."""
    import numpy as np

    if isinstance(value, dict):
        if "array" in value:
            flat = [decode_float(v) for v in value["array"]]
            return np.array(flat, dtype=str(value.get("dtype", "float64"))).reshape(
                [int(d) for d in value.get("shape", [len(flat)])])
        return str(value.get("text", ""))
    return decode_float(value)

