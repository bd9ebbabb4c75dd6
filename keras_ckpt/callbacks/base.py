"""What every keras-ckpt callback shares: the stateful protocol, Keras-style messages."""

from __future__ import annotations

import math

from keras_ckpt.fit.protocol import StatefulCallback
from keras_ckpt.keras_compat import print_msg

__all__ = ["StatefulCallback", "print_msg", "non_finite_logs"]


def non_finite_logs(logs: dict | None) -> dict[str, float]:
    """The numeric log values that are NaN or infinite, by key, in log order."""
    bad = {}
    for key, value in (logs or {}).items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(number):
            bad[key] = number
    return bad
