"""Argument checks shared by public constructors: errors name the argument and what is valid."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

__all__ = ["check_number", "check_choice", "check_bool"]


def check_number(name: str, value: Any, *, allow_none: bool = False,
                 minimum: float | None = None, integer: bool = False,
                 exclusive: bool = False) -> None:
    """Raises a TypeError/ValueError naming `name` unless `value` is a valid number."""
    if value is None and allow_none:
        return
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if integer else "a number"
        raise TypeError(f"`{name}` must be {what}{' or None' if allow_none else ''}; "
                        f"got {value!r}.")
    if not math.isfinite(float(value)):
        raise ValueError(f"`{name}` must be a finite number; got {value!r}.")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise ValueError(f"`{name}` must be {'>' if exclusive else '>='} {minimum}; "
                         f"got {value!r}.")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raises a ValueError naming `name` unless `value` is one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}; got {value!r}.")


def check_bool(name: str, value: Any) -> None:
    """Raises a TypeError naming `name` unless `value` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False; got {value!r}.")
