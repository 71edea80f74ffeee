"""bdiff.checks: the one integer and the one number check every layer uses (bools refused, bounds named)."""

from __future__ import annotations

import numpy as np
import pytest

from bdiff.checks import as_integer, as_number


def test_integers_pass_through_as_int_including_numpy_ones() -> None:
    assert as_integer("n", 3, 1) == 3 and type(as_integer("n", np.int64(3), 1)) is int
    assert as_integer("seed", -5) == -5 and as_integer("t", 999, 0, 999) == 999


@pytest.mark.parametrize(("value", "low", "high", "message"), [
    (True, None, None, r"n must be an integer, got True"),
    (2.0, 1, None, r"n must be an integer >= 1, got 2\.0"),
    ("3", 1, None, r"got '3'"),
    (0, 1, None, r"n must be an integer >= 1, got 0"),
    (1000, 0, 999, r"n must be an integer in \[0, 999\], got 1000"),
    (7, None, 5, r"n must be an integer <= 5, got 7"),
])
def test_anything_else_is_refused_with_the_name_and_the_bounds(value: object, low, high, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        as_integer("n", value, low, high)


def test_numbers_pass_through_as_float_within_closed_or_open_bounds() -> None:
    assert as_number("w", 0, 0) == 0.0 and type(as_number("w", np.float32(0.5), 0, 1)) is float
    assert as_number("q", 0.5, 0, 1, exclusive=True) == 0.5 and as_number("x", -3) == -3.0


@pytest.mark.parametrize(("value", "low", "high", "exclusive", "message"), [
    (True, None, None, False, r"w must be a finite number, got True"),
    (float("nan"), 0, None, False, r"w must be a finite number >= 0, got nan"),
    (float("inf"), None, None, False, r"got inf"),
    ("0.5", 0, 1, False, r"got '0\.5'"),
    (-0.1, 0, None, False, r"w must be a finite number >= 0, got -0\.1"),
    (0, 0, None, True, r"w must be a finite number > 0, got 0"),
    (1.0, 0, 1, True, r"w must be a finite number in \(0, 1\), got 1\.0"),
    (2, 0, 1, False, r"w must be a finite number in \[0, 1\], got 2"),
])
def test_non_numbers_and_numbers_out_of_bounds_are_refused_by_name(value: object, low, high, exclusive: bool,
                                                                    message: str) -> None:
    with pytest.raises(ValueError, match=message):
        as_number("w", value, low, high, exclusive=exclusive)
