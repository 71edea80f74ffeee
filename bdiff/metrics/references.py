"""The real side of every quality number: features of the real digits training split, per feature space.

``references_for(spaces)`` gives, for each feature space, its extractor and the features of the
training split (:func:`bdiff.datasets.digits_split`), cached under the feature cache. It only
loads: a missing digits classifier raises FileNotFoundError naming the command that builds it
(``python -m bdiff.lit.feature_module cache``; ``bdiff-evaluate --train-features-if-missing`` and
:func:`bdiff.lit.feature_module.ensure_feature_nets` run that training in process).

Example:
    >>> references = references_for(["pixels"])
    >>> extractor, f_real = references["pixels"]  # f_real: (1617, 64)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from bdiff.datasets import digits_split
from bdiff.metrics.features import DIGITS_SPACES, default_cache_dir, get_feature_extractor
from bdiff.metrics.frechet import cached_features, extract_features


def reference_features(extractor: torch.nn.Module, name: str, cache_dir: Path) -> torch.Tensor:
    """Features (N, D) of the real digits training split under ``extractor``, cached under ``cache_dir``."""
    return cached_features(f"ref_{name}_digits_train", cache_dir, lambda: extract_features(digits_split("train"), extractor))


def reference_for(features: str = "digits", fallback: str | None = None) -> tuple[torch.nn.Module, torch.Tensor]:
    """(extractor, features of the real digits training split) for the named feature space."""
    extractor = get_feature_extractor(features, fallback=fallback)
    return extractor, reference_features(extractor, features, default_cache_dir())


def references_for(spaces: Sequence[str] = DIGITS_SPACES,
                   fallback: str | None = None) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """{space: (extractor, features of the real digits training split)} for every named space."""
    return {name: reference_for(name, fallback) for name in spaces}
