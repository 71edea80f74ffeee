"""Argument checks shared by every layer (the lowest one: it imports nothing from bdiff).

Python's ``bool`` is an ``int`` (``isinstance(True, int)`` holds), but a flag where a count
belongs is a mistake worth naming, so :func:`as_integer` refuses it.
"""

from __future__ import annotations

import numbers


def as_integer(name: str, value: object, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int; ValueError naming ``name`` unless it is an integer (not a bool) in [low, high]."""
    integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not integral or (low is not None and value < low) or (high is not None and value > high):  # type: ignore[operator]
        bounds = {(True, True): f" in [{low}, {high}]", (True, False): f" >= {low}", (False, True): f" <= {high}"}
        raise ValueError(f"{name} must be an integer{bounds.get((low is not None, high is not None), '')}, got {value!r}")
    return int(value)  # type: ignore[call-overload]
