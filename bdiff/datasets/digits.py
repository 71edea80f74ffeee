"""scikit-learn's bundled 8x8 digits as plain tensors, without Lightning, and the seeded train/val split.

:mod:`bdiff.lit.data`'s datamodules split every dataset with :func:`seeded_split`, so
:func:`digits_split` returns exactly the images a default digits run (``DigitsDataModule(seed=0)``)
trains and validates on. No download ever happens: the digits ship with scikit-learn.

Example:
    >>> digits_split("val").shape  # the 180 held-out digits in [0, 1]
    torch.Size([180, 1, 8, 8])
"""

from __future__ import annotations

import torch

DIGITS_VAL_FRACTION = 0.1  # DigitsDataModule's default


def seeded_split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, validation indices) of ``n`` items: a seeded permutation, the last
    ``max(1, round(n * val_fraction))`` of it for validation (the training list may be empty)."""
    n_val = max(1, round(n * val_fraction))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[: n - n_val], perm[n - n_val :]


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 digits: images (N,1,8,8) float32 in [0, 1] and labels (N,) int64."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.as_tensor(digits.target, dtype=torch.int64)


def digits_split(split: str, seed: int = 0) -> torch.Tensor:
    """Real digits of the ``"train"`` or ``"val"`` split of ``DigitsDataModule(seed=seed)`` in [0, 1], (N,1,8,8)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    images, _ = load_digits()
    train, val = seeded_split(len(images), DIGITS_VAL_FRACTION, seed)
    return images[train if split == "train" else val]
