"""Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric
for Assessing Generative Models", Sec. 2).

Each set's manifold is the union of balls around its samples, each ball's radius being the
distance to that sample's k-th nearest neighbour in the same set. Precision is the fraction of
fake samples inside the real manifold; recall the fraction of real samples inside the fake one.

Written by hand: torchmetrics has no precision/recall for generative models, and the reference
code (NVlabs stylegan2-ada ``metrics/precision_recall.py``) is TensorFlow/dnnlib-bound. Distances
come from ``torch.cdist`` on row chunks, so memory is O(chunk_size * N), never O(N^2).

Example::

    >>> import torch
    >>> f = torch.randn(100, 8)
    >>> precision_recall(f, f)
    (1.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["chunked_cdist", "knn_radii", "manifold_coverage", "precision_recall"]


def chunked_cdist(a: Tensor, b: Tensor, chunk_size: int = 1024) -> Iterator[tuple[slice, Tensor]]:
    """Yield ``(rows, D)`` with ``D = cdist(a[rows], b)`` of shape (len(rows), N_b), chunk by chunk.

    ``a``: (N_a, D), ``b``: (N_b, D); computed in at least float32 on ``a``'s device.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    b = b.to(a.device, dtype)
    for start in range(0, a.shape[0], chunk_size):
        rows = slice(start, min(start + chunk_size, a.shape[0]))
        yield rows, torch.cdist(a[rows].to(dtype), b)


def knn_radii(f: Tensor, k: int = 3, chunk_size: int = 1024) -> Tensor:
    """(N,) distance from each row of ``f`` (N, D) to its k-th nearest *other* row."""
    radii = torch.empty(f.shape[0], device=f.device, dtype=torch.promote_types(f.dtype, torch.float32))
    for rows, d in chunked_cdist(f, f, chunk_size):
        # k + 1 smallest include the point itself at distance 0; the last one is the k-th neighbour.
        radii[rows] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return radii


def manifold_coverage(
    f_query: Tensor, f_ref: Tensor, ref_radii: Tensor, chunk_size: int = 1024
) -> Tensor:
    """(N_q,) bool: is each query row inside at least one ball ``|x - f_ref[j]| <= ref_radii[j]``?"""
    inside = torch.empty(f_query.shape[0], dtype=torch.bool, device=f_query.device)
    for rows, d in chunked_cdist(f_query, f_ref, chunk_size):
        inside[rows] = (d <= ref_radii.to(d)).any(dim=1)
    return inside


def _check(name: str, f: Tensor, k: int) -> None:
    if not isinstance(f, Tensor) or f.ndim != 2:
        shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
        raise ValueError(f"{name} must be a (N, D) feature tensor, got {shape}")
    if k >= f.shape[0]:
        raise ValueError(
            f"k={k} needs more than k samples in {name} (k-th neighbour excluding itself); "
            f"{name} has N={f.shape[0]}: lower k or add samples"
        )
    if not torch.isfinite(f).all():
        raise ValueError(f"{name} contains NaN or inf")


def precision_recall(f_real: Tensor, f_fake: Tensor, k: int = 3, chunk_size: int = 1024) -> tuple[float, float]:
    """Improved (precision, recall) of fake features (N_f, D) against real features (N_r, D).

    precision = fraction of fake samples inside at least one real k-NN ball;
    recall = fraction of real samples inside at least one fake k-NN ball.
    Needs ``1 <= k < N`` for both sets. Ball membership uses ``<=``, as the reference code.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    _check("f_real", f_real, k)
    _check("f_fake", f_fake, k)
    if f_real.shape[1] != f_fake.shape[1]:
        raise ValueError(f"feature dims differ: f_real has D={f_real.shape[1]}, f_fake has D={f_fake.shape[1]}")
    f_fake = f_fake.to(f_real.device)
    precision = manifold_coverage(f_fake, f_real, knn_radii(f_real, k, chunk_size), chunk_size)
    recall = manifold_coverage(f_real, f_fake, knn_radii(f_fake, k, chunk_size), chunk_size)
    return precision.float().mean().item(), recall.float().mean().item()
