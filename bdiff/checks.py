"""Argument checks shared by every layer (the lowest one: it imports nothing from bdiff).

Python's ``bool`` is an ``int`` (``isinstance(True, int)`` holds), but a flag where a count
belongs is a mistake worth naming, so :func:`as_integer` and :func:`as_number` refuse it; no
option means anything at inf or NaN, so :func:`as_number` refuses those too.
"""

from __future__ import annotations

import math
import numbers


def _bounds(low: float | None, high: float | None, exclusive: bool = False) -> str:
    """How the bounds read in an error: `` in [0, 1]``, `` > 0``, `` <= 5`` or nothing."""
    if low is not None and high is not None:
        return f" in {'(' if exclusive else '['}{low}, {high}{')' if exclusive else ']'}"
    if low is not None:
        return f" {'>' if exclusive else '>='} {low}"
    return "" if high is None else f" {'<' if exclusive else '<='} {high}"


def as_integer(name: str, value: object, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int; ValueError naming ``name`` unless it is an integer (not a bool) in [low, high]."""
    integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not integral or (low is not None and value < low) or (high is not None and value > high):  # type: ignore[operator]
        raise ValueError(f"{name} must be an integer{_bounds(low, high)}, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def as_number(
    name: str, value: object, low: float | None = None, high: float | None = None, *, exclusive: bool = False
) -> float:
    """``value`` as a float; ValueError naming ``name`` unless it is a finite real number (not a bool) in
    [low, high], or in (low, high) when ``exclusive``."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    below = low is not None and real and (value <= low if exclusive else value < low)  # type: ignore[operator]
    above = high is not None and real and (value >= high if exclusive else value > high)  # type: ignore[operator]
    if not real or below or above:
        raise ValueError(f"{name} must be a finite number{_bounds(low, high, exclusive)}, got {value!r}")
    return float(value)  # type: ignore[arg-type]
