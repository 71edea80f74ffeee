"""One place that turns a sample set into the evaluation numbers (used by the CLI and benchmarks).

Quality: Fréchet distance, KID, precision/recall (and, for a classifier's features, its mean
confidence) in one feature space, or in several (:func:`quality_in_spaces`): a claim about
sample quality should hold in every space the evaluator has.
Uncertainty usefulness (when the set carries a variance map): what dropping the 20% least
certain by the per-sample score (:func:`~bdiff.metrics.usefulness.sample_score`) does to FD,
precision, recall and classifier error in every space, against dropping a random 20%
(:func:`filtering_in_spaces`); and how the raw mean variance ranks samples: Spearman with the
distance to the nearest real feature, AUROC for finding the worst 20%.
Cost: NFE, wall time, samples per second, peak memory (as recorded by the sampler).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from bdiff.metrics.frechet import extract_features, frechet_distance_from_features, kernel_inception_distance_from_features
from bdiff.metrics.precision_recall import precision_recall
from bdiff.metrics.samples_file import SampleSet
from bdiff.metrics.usefulness import (
    auroc_worst,
    fd_after_filtering,
    nearest_real_distance,
    per_sample_uncertainty,
    sample_score,
    spearman,
)

RANDOM_DROPS = 5  # random drops averaged for the baseline of a filter


def quality_from_features(f_real: Tensor, f_fake: Tensor, kid_subset: int = 1000) -> dict[str, float]:
    """FD, KID (mean, std), precision, recall between two feature sets (N,D)."""
    subset = min(kid_subset, len(f_real), len(f_fake))
    kid, kid_std = kernel_inception_distance_from_features(f_real, f_fake, subset_size=subset, subsets=50)
    precision, recall = precision_recall(f_real, f_fake, k=3)
    return {
        "fd": frechet_distance_from_features(f_real, f_fake),
        "kid": kid,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
    }


def usefulness_from_features(f_real: Tensor, f_fake: Tensor, variance: Tensor, score: Tensor,
                             drop: float = 0.2) -> dict[str, float]:
    """Does uncertainty find bad samples? FD after dropping the least certain by ``score`` (N,); the ranking
    of the raw mean of ``variance`` (N,C,H,W) against the distance to the nearest real feature."""
    u = per_sample_uncertainty(variance)
    q = nearest_real_distance(f_fake, f_real)
    filtered = fd_after_filtering(f_real, f_fake, score, drop=drop, seeds=range(RANDOM_DROPS))
    return {
        "fd_drop_uncertain": filtered["fd_drop_uncertain"],
        "fd_drop_random_mean": filtered["fd_drop_random_mean"],
        "fd_drop_random_std": filtered["fd_drop_random_std"],
        "fd_ratio_uncertain_vs_random": filtered["fd_drop_uncertain"] / filtered["fd_drop_random_mean"],
        "spearman_uncertainty_vs_nn_distance": spearman(u, q),
        "auroc_worst_20": auroc_worst(u, q, fraction=drop),
    }


def classifier_confidence(images: Tensor, extractor: nn.Module, batch_size: int = 1000) -> float | None:
    """Mean max-softmax probability of a classifier extractor on images (N,C,H,W) in [0, 1]; None otherwise."""
    if not getattr(extractor, "is_classifier", False):
        return None
    return float(torch.cat([extractor.confidence(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]).mean())


def quality_in_spaces(images: Tensor, references: Mapping[str, tuple[nn.Module, Tensor]]) -> dict[str, dict[str, Any]]:
    """FD, KID, precision/recall (and classifier confidence) of images (N,C,H,W) in [0, 1] in every space.

    ``references`` maps a space's name to (extractor, real features (N_real, D)).
    """
    out = {}
    for name, (extractor, f_real) in references.items():
        row: dict[str, Any] = quality_from_features(f_real, extract_features(images, extractor))
        confidence = classifier_confidence(images, extractor)
        if confidence is not None:
            row["confidence"] = confidence
        out[name] = row
    return out


def filtering_in_spaces(images: Tensor, score: Tensor, references: Mapping[str, tuple[nn.Module, Tensor]],
                        drop: float = 0.2) -> dict[str, dict[str, float]]:
    """What dropping the ``drop`` least certain by ``score`` (N,) does, against a random ``drop`` (mean of 5), per space.

    images (N,C,H,W) in [0, 1]. Per space: ``fd``, ``precision``, ``recall`` (and ``error``, 1 - mean confidence,
    for a classifier) after each drop, as ``<metric>_certain`` and ``<metric>_random``.
    """
    n = len(images)
    n_keep = n - round(drop * n)
    if not 2 <= n_keep < n:
        raise ValueError(f"drop={drop} of N={n} keeps {n_keep} samples; need to drop >= 1 and keep >= 2")
    certain = score.argsort(stable=True)[:n_keep]
    randoms = [torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_keep] for seed in range(RANDOM_DROPS)]
    out = {}
    for name, (extractor, f_real) in references.items():
        f_fake = extract_features(images, extractor)

        def measure(keep: Tensor) -> dict[str, float]:
            q = quality_from_features(f_real, f_fake[keep], kid_subset=100)
            row = {k: q[k] for k in ("fd", "precision", "recall")}
            confidence = classifier_confidence(images[keep], extractor)
            if confidence is not None:
                row["error"] = 1 - confidence
            return row

        random_rows = [measure(keep) for keep in randoms]
        row = {f"{k}_certain": v for k, v in measure(certain).items()}
        row.update({f"{k}_random": sum(r[k] for r in random_rows) / len(random_rows) for k in random_rows[0]})
        out[name] = row
    return out


def evaluate_sample_set(samples: SampleSet, f_real: Tensor, extractor: nn.Module) -> dict[str, Any]:
    """Every metric for one sample set against real features (N_real, D)."""
    f_fake = extract_features(samples.images, extractor)
    out: dict[str, Any] = {"n": len(samples.images), **quality_from_features(f_real, f_fake)}
    confidence = classifier_confidence(samples.images, extractor)
    if confidence is not None:
        out["confidence"] = confidence
    out.update(
        nfe=samples.nfe,
        seconds=samples.seconds,
        samples_per_second=len(samples.images) / samples.seconds if samples.seconds > 0 else None,
        peak_memory_mb=samples.config.get("peak_memory_mb"),
    )
    if samples.variance is not None and float(samples.variance.max()) > 0:
        score = samples.score if samples.score is not None else sample_score(samples.images, samples.variance)
        out.update(usefulness_from_features(f_real, f_fake, samples.variance, score))
    return out


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of ``rows`` restricted to ``columns`` (floats to 4 significant digits)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
