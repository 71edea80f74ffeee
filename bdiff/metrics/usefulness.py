"""Does the sampler's uncertainty find the bad samples?

Given a per-sample uncertainty ``u`` (N,) (e.g. :func:`per_sample_uncertainty` of the stored
variance maps) and a per-sample badness ``q`` (N,) (higher = worse, e.g.
:func:`nearest_real_distance` in feature space), we report

- rank agreement: Spearman's rho between u and q (``scipy.stats.spearmanr``);
- detection: AUROC of u for flagging the worst ``fraction`` of samples by q
  (``sklearn.metrics.roc_auc_score``), the "selective prediction" view of uncertainty;
- filtering: FD after dropping the most uncertain ``drop`` of samples versus after dropping a
  random ``drop`` of them (same number kept, so FD's sample-size bias cancels).

Example::

    >>> import torch
    >>> q = torch.rand(50)
    >>> auroc_worst(q, q), round(spearman(q, q), 6)
    (1.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from torch import Tensor

from bdiff.metrics.frechet import frechet_distance_from_features
from bdiff.metrics.precision_recall import chunked_cdist

__all__ = [
    "per_sample_uncertainty", "uncertainty_within_clusters", "sample_score", "keep_most_certain", "rank_by_uncertainty", "filter_by_uncertainty",
    "nearest_real_distance", "spearman",
    "auroc_worst", "fd_after_filtering",
]


def per_sample_uncertainty(variance: Tensor) -> Tensor:
    """(N,C,H,W) per-pixel variance -> (N,) mean variance per sample."""
    if not isinstance(variance, Tensor) or variance.ndim != 4:
        shape = tuple(variance.shape) if isinstance(variance, Tensor) else type(variance).__name__
        raise ValueError(f"variance must be a (N,C,H,W) tensor, got {shape}")
    if not torch.isfinite(variance).all() or (variance < 0).any():
        raise ValueError("variance must be finite and >= 0 everywhere")
    return variance.flatten(1).mean(dim=1)


SAMPLES_PER_CLUSTER = 50  # look-alike groups of ~50 samples (20 clusters for 1,000): chosen on one run and seed


def uncertainty_within_clusters(images: Tensor, variance: Tensor, clusters: int | None = None, seed: int = 0) -> Tensor:
    """(N,) per-sample uncertainty as a rank in [0, 1] *within* the sample's cluster of look-alikes.

    Mean variance grows with content (a digit with more ink has more uncertain pixels), so dropping
    the most uncertain samples of a batch drops whole modes and distorts it (FD after filtering
    rises). Ranking within k-means clusters of the images' pixels (scikit-learn's KMeans; no
    reference data or feature network needed) compares each sample only with similar ones, so a
    filter keeps the batch's mix of modes. ``clusters`` defaults to N // SAMPLES_PER_CLUSTER (at
    least 2) and is capped at N // 2. Fewer, larger clusters drop more of the samples a classifier finds ambiguous
    but more whole modes; on the digits, clusters of ~50 samples balanced the two best
    (``benchmarks/where_uncertainty_pays.py``; BENCHMARKS.md, "Filtering by uncertainty").
    images, variance: (N,C,H,W).
    """
    from sklearn.cluster import KMeans

    u = per_sample_uncertainty(variance).double()
    if images.shape[0] != u.shape[0]:
        raise ValueError(f"images has {images.shape[0]} samples but variance has {u.shape[0]}")
    k = max(1, min(clusters or max(2, len(u) // SAMPLES_PER_CLUSTER), len(u) // 2))
    labels = torch.as_tensor(KMeans(k, n_init=4, random_state=seed).fit_predict(images.flatten(1).double().cpu().numpy()))
    out = torch.zeros_like(u)
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        order = u[members].argsort(stable=True)
        out[members[order]] = torch.linspace(0, 1, len(members), dtype=torch.float64) if len(members) > 1 else 0.5
    return out


def sample_score(images: Tensor, variance: Tensor) -> Tensor:
    """The per-sample uncertainty score bdiff ships: (N,) in [0, 1], higher = less certain.

    The sample's mean propagated variance ranked *within* its cluster of look-alikes
    (:func:`uncertainty_within_clusters`): 0 is the most certain of its cluster, 1 the least.
    What it is: how unsure the model was of this sample compared with samples that look like it;
    dropping the highest drops the least certain of every kind, and keeps the batch's mix of kinds.
    What it is not: an ink or content detector (the raw mean variance is one: it grows with the
    number of uncertain edge pixels, so a raw cut drops whole kinds of image and FD rises), nor a
    score comparable across batches (a rank depends on its batch). ``bdiff.sample`` stores it in
    the samples file (``score``) and ``--keep`` filters by it. images, variance: (N,C,H,W).
    """
    return uncertainty_within_clusters(images, variance)


def keep_most_certain(images: Tensor, variance: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(indices (n,) in increasing order, score (N,)): the ``n`` samples :func:`sample_score` ranks most certain."""
    if not 1 <= n <= len(images):
        raise ValueError(f"cannot keep {n} of {len(images)} samples")
    score = sample_score(images, variance)
    kept = score.argsort(stable=True)[:n].sort().values
    return kept, score


def rank_by_uncertainty(variance: Tensor, descending: bool = False, images: Tensor | None = None) -> Tensor:
    """Sample order by :func:`per_sample_uncertainty` of (N,C,H,W) variance maps -> indices (N,), most confident first.

    With ``images`` (N,C,H,W), by :func:`uncertainty_within_clusters` instead (keeps the mix of modes)."""
    score = per_sample_uncertainty(variance) if images is None else uncertainty_within_clusters(images, variance)
    return score.argsort(descending=descending, stable=True)


def filter_by_uncertainty(variance: Tensor, keep: float, images: Tensor | None = None) -> Tensor:
    """Indices of the ``keep`` fraction of samples that :func:`rank_by_uncertainty` ranks most confident."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    order = rank_by_uncertainty(variance, images=images)
    return order[: max(1, round(keep * len(order)))]


def nearest_real_distance(f_fake: Tensor, f_real: Tensor, chunk_size: int = 1024) -> Tensor:
    """(N_f,) Euclidean distance from each fake feature (N_f, D) to its nearest real one (N_r, D)."""
    for name, f in (("f_fake", f_fake), ("f_real", f_real)):
        if not isinstance(f, Tensor) or f.ndim != 2 or f.shape[0] == 0:
            shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"{name} must be a non-empty (N, D) feature tensor, got {shape}")
    if f_fake.shape[1] != f_real.shape[1]:
        raise ValueError(f"feature dims differ: f_fake has D={f_fake.shape[1]}, f_real has D={f_real.shape[1]}")
    out = torch.empty(f_fake.shape[0], device=f_fake.device, dtype=torch.promote_types(f_fake.dtype, torch.float32))
    for rows, d in chunked_cdist(f_fake, f_real, chunk_size):
        out[rows] = d.min(dim=1).values
    return out


def _pair(u: Tensor, q: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Validate two (N,) score vectors and return them as float64 numpy arrays."""
    u_np = np.asarray(torch.as_tensor(u).detach().cpu(), dtype=np.float64)
    q_np = np.asarray(torch.as_tensor(q).detach().cpu(), dtype=np.float64)
    if u_np.ndim != 1 or q_np.shape != u_np.shape:
        raise ValueError(f"u and q must be (N,) vectors of equal length, got shapes {u_np.shape} and {q_np.shape}")
    if u_np.shape[0] < 2:
        raise ValueError(f"need at least 2 samples, got {u_np.shape[0]}")
    if not (np.isfinite(u_np).all() and np.isfinite(q_np).all()):
        raise ValueError("u and q must be finite (no NaN/inf)")
    return u_np, q_np


def spearman(u: Tensor, q: Tensor) -> float:
    """Spearman rank correlation between uncertainty u (N,) and badness q (N,); 1 = same order."""
    u_np, q_np = _pair(u, q)
    for name, x in (("u", u_np), ("q", q_np)):
        if np.all(x == x[0]):
            raise ValueError(f"{name} is constant; Spearman's rho is undefined for a constant vector")
    return float(spearmanr(u_np, q_np).statistic)


def auroc_worst(u: Tensor, q: Tensor, fraction: float = 0.2) -> float:
    """AUROC of uncertainty u (N,) for detecting the worst ``fraction`` of samples by badness q (N,).

    The ``round(fraction * N)`` samples with the largest q are positives (ties at the cut are
    broken by index order). 1 = u ranks every bad sample above every good one; 0.5 = chance.
    """
    u_np, q_np = _pair(u, q)
    n = u_np.shape[0]
    n_bad = round(fraction * n)
    if not 1 <= n_bad <= n - 1:
        raise ValueError(f"fraction={fraction} of N={n} gives {n_bad} bad samples; need between 1 and N-1")
    labels = np.zeros(n, dtype=bool)
    labels[np.argsort(-q_np, kind="stable")[:n_bad]] = True
    return float(roc_auc_score(labels, u_np))


def fd_after_filtering(
    f_real: Tensor, f_fake: Tensor, u: Tensor, drop: float = 0.2, seeds: Iterable[int] = range(5)
) -> dict[str, float]:
    """FD (from features) after dropping the most uncertain ``drop`` of fakes vs a random ``drop``.

    Args:
        f_real: (N_r, D) real features. f_fake: (N_f, D) fake features. u: (N_f,) uncertainty.
        drop: fraction of fake samples to drop. seeds: one random drop per seed.

    Returns:
        ``fd_all`` (no filtering), ``fd_drop_uncertain``, ``fd_drop_random_mean`` and
        ``fd_drop_random_std`` (sample std over seeds, 0 for one seed), and ``n_kept``.
        Uncertainty is useful when ``fd_drop_uncertain`` is clearly below the random mean.
    """
    u_t = torch.as_tensor(u).detach().flatten()
    if u_t.shape[0] != f_fake.shape[0]:
        raise ValueError(f"u has {u_t.shape[0]} entries but f_fake has {f_fake.shape[0]} samples")
    if not torch.isfinite(u_t).all():
        raise ValueError("u must be finite (no NaN/inf)")
    n = f_fake.shape[0]
    n_keep = n - round(drop * n)
    if not 2 <= n_keep < n:
        raise ValueError(f"drop={drop} of N={n} keeps {n_keep} samples; need to drop >= 1 and keep >= 2")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds is empty; give at least one seed for the random-drop baseline")
    certain = torch.argsort(u_t, stable=True)[:n_keep].to(f_fake.device)
    random_fds = []
    for seed in seeds:
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_keep].to(f_fake.device)
        random_fds.append(frechet_distance_from_features(f_real, f_fake[keep]))
    std = float(np.std(random_fds, ddof=1)) if len(random_fds) > 1 else 0.0
    return {
        "fd_all": frechet_distance_from_features(f_real, f_fake),
        "fd_drop_uncertain": frechet_distance_from_features(f_real, f_fake[certain]),
        "fd_drop_random_mean": float(np.mean(random_fds)),
        "fd_drop_random_std": std,
        "n_kept": n_keep,
    }
