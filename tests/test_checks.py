"""bdiff.checks.as_integer: the one integer check every layer uses (bools refused, bounds named)."""

from __future__ import annotations

import numpy as np
import pytest

from bdiff.checks import as_integer


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
