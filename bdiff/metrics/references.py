"""The real side of every quality number: the real data, and its features per feature space.

:class:`RealData` holds the real images a model is measured against -- the training split it
learned from (the reference of FD, precision and recall), the validation split (calibration) and
their class labels (what the classifier feature spaces are trained on). ``RealData.digits()`` is
the default run's data; :meth:`RealData.of_datamodule` takes any datamodule of
:mod:`bdiff.lit.data` with labels, e.g. an image folder of photos (the evaluator rebuilds it
from the checkpoint).

``references_for(spaces, data=...)`` gives, for each feature space, its extractor and the
features of the training split, cached under the feature cache by the data's ``key``. It only
loads: a missing classifier raises FileNotFoundError naming the command that builds it
(:func:`bdiff.lit.feature_module.ensure_feature_nets` and ``bdiff-evaluate
--train-features-if-missing`` train it in process).

Example:
    >>> references = references_for(["pixels"])
    >>> extractor, f_real = references["pixels"]  # f_real: (1617, 64)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bdiff.datasets import DIGITS_VAL_FRACTION, load_digits, seeded_split
from bdiff.metrics.features import (
    DATA_SPACES,
    DIGITS_KEY,
    DIGITS_SPACES,
    default_cache_dir,
    get_feature_extractor,
)
from bdiff.metrics.frechet import cached_features, extract_features


@dataclass(frozen=True)
class RealData:
    """Real images in [0, 1] and their class labels, split as the model's run split them.

    Attributes:
        key: names the data in cache files: ``"digits"``, else ``"data-"`` + a hash of the
            training images and labels (the same images give the same key, wherever they live).
        train: (N, C, H, W) float32 in [0, 1], the training split.
        train_labels: (N,) int64 in 0..K-1.
        val: (M, C, H, W), the validation split.
        val_labels: (M,) int64.
        class_names: K names, ``class_names[k]`` for label k.
    """

    key: str
    train: Tensor
    train_labels: Tensor
    val: Tensor
    val_labels: Tensor
    class_names: list[str] = field(default_factory=list)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return tuple(self.train.shape[1:])  # type: ignore[return-value]

    @property
    def default_spaces(self) -> tuple[str, ...]:
        """The feature spaces quality on this data is reported in (:data:`DIGITS_SPACES` or :data:`DATA_SPACES`)."""
        return DIGITS_SPACES if self.key == DIGITS_KEY else DATA_SPACES

    @classmethod
    def digits(cls, seed: int = 0) -> RealData:
        """scikit-learn's digits, split as ``DigitsDataModule(seed=seed)`` splits them."""
        images, labels = load_digits()
        train, val = seeded_split(len(images), DIGITS_VAL_FRACTION, seed)
        key = DIGITS_KEY if seed == 0 else f"{DIGITS_KEY}-split{seed}"
        return cls(key, images[train], labels[train], images[val], labels[val], [str(d) for d in range(10)])

    @classmethod
    def of_datamodule(cls, datamodule: Any) -> RealData:
        """The data of a set-up :class:`bdiff.lit.data.ImageDataModule` with class labels (items in [-1, 1])."""
        datamodule.setup("fit")
        train_labels, names = datamodule.split_labels("train")
        val_labels, _ = datamodule.split_labels("val")
        train = _stack(datamodule.train_dataset)
        digest = hashlib.sha256(train.numpy().tobytes())
        digest.update(train_labels.numpy().tobytes())
        return cls(f"data-{digest.hexdigest()[:16]}", train, train_labels, _stack(datamodule.val_dataset), val_labels,
                   list(names))


def _stack(dataset: Any) -> Tensor:
    """The items (C, H, W) in [-1, 1] of ``dataset`` as one (N, C, H, W) float32 tensor in [0, 1]."""
    return ((torch.stack([dataset[i] for i in range(len(dataset))]).float() + 1) / 2).clamp(0, 1)


def reference_features(extractor: torch.nn.Module, name: str, cache_dir: Path, data: RealData | None = None) -> Tensor:
    """Features (N, D) of the real training split of ``data`` (default: the digits) under ``extractor``, cached."""
    data = data if data is not None else RealData.digits()
    return cached_features(f"ref_{name}_{data.key}_train", cache_dir, lambda: extract_features(data.train, extractor))


def reference_for(features: str = "digits", fallback: str | None = None,
                  data: RealData | None = None) -> tuple[torch.nn.Module, Tensor]:
    """(extractor, features of the real training split of ``data``, default the digits) for the named space."""
    data = data if data is not None else RealData.digits()
    extractor = get_feature_extractor(features, fallback=fallback, image_shape=data.image_shape, data_key=data.key)
    return extractor, reference_features(extractor, features, default_cache_dir(), data)


def references_for(spaces: Sequence[str] | None = None, fallback: str | None = None,
                   data: RealData | None = None) -> dict[str, tuple[torch.nn.Module, Tensor]]:
    """{space: (extractor, features of the real training split)} for every named space (default: the data's own)."""
    data = data if data is not None else RealData.digits()
    return {name: reference_for(name, fallback, data) for name in (spaces or data.default_spaces)}
