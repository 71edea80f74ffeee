"""Datasets that ship with a Python package, so nothing is ever downloaded.

* :mod:`bdiff.datasets.digits` -- scikit-learn's bundled 8x8 digits as tensors and the seeded
  train/val split every datamodule uses (the default run's data).
* :mod:`bdiff.datasets.photos` -- 32x32 crops of the photographs bundled inside scikit-image,
  written as an ImageFolder tree (``python -m bdiff.datasets.photos OUT``; needs ``.[photos]``).
"""

from bdiff.datasets.digits import (
    DIGITS_VAL_FRACTION,
    digits_split,
    load_digits,
    seeded_split,
)

__all__ = ["DIGITS_VAL_FRACTION", "digits_split", "load_digits", "seeded_split"]
