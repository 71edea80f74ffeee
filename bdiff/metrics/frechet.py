"""Fréchet distance (FD) and kernel inception distance (KID) between two sets of features.

FD (Heusel et al. 2017, "GANs trained by a two time-scale update rule...") fits a Gaussian to
each feature set and returns ``|mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))``.
KID (Bińkowski et al. 2018, "Demystifying MMD GANs") is the unbiased squared MMD with the cubic
polynomial kernel ``k(x, y) = (x.y / D + 1)^3``, averaged over random subsets.

Both are computed by torchmetrics (``FrechetInceptionDistance`` / ``KernelInceptionDistance``).
We extract features ourselves (batched, ``no_grad``, eval mode, on the images' device) and hand
torchmetrics an identity "extractor"; this keeps one code path for images and cached features,
lets FD and KID share one feature pass, and never needs torch-fidelity (only required by
torchmetrics for its built-in InceptionV3). Any ``nn.Module`` mapping (N,C,H,W) images in
[0, 1] to (N,D) features works, e.g. ``nn.Flatten()`` for a pixel-space FD.

Example::

    >>> import torch
    >>> from torch import nn
    >>> real, fake = torch.rand(64, 1, 2, 2), torch.rand(64, 1, 2, 2)
    >>> round(frechet_distance(real, real, nn.Flatten()), 6)
    0.0
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

__all__ = [
    "extract_features",
    "real_feature_stats",
    "cached_features",
    "frechet_distance",
    "frechet_distance_from_features",
    "kernel_inception_distance",
    "kernel_inception_distance_from_features",
]


class _Identity(nn.Module):
    """Features-in, features-out "extractor"; ``num_features`` spares torchmetrics a dummy forward."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


def _check_features(name: str, f: Tensor, min_n: int = 2) -> None:
    if not isinstance(f, Tensor) or f.ndim != 2:
        shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
        raise ValueError(f"{name} must be a (N, D) feature tensor, got {shape}")
    if f.shape[0] < min_n:
        raise ValueError(f"{name} has {f.shape[0]} samples; at least {min_n} are needed")
    if not torch.isfinite(f).all():
        raise ValueError(f"{name} contains NaN or inf; check the feature extractor and the images")


def _check_pair(f_real: Tensor, f_fake: Tensor, min_n: int = 2) -> None:
    _check_features("f_real", f_real, min_n)
    _check_features("f_fake", f_fake, min_n)
    if f_real.shape[1] != f_fake.shape[1]:
        raise ValueError(f"feature dims differ: f_real has D={f_real.shape[1]}, f_fake has D={f_fake.shape[1]}")


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the block and restore its previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def extract_features(images: Tensor, features: nn.Module, batch_size: int = 500) -> Tensor:
    """Map (N,C,H,W) images in [0, 1] to (N,D) features, ``batch_size`` images at a time.

    Runs under ``torch.no_grad`` with ``features`` temporarily in eval mode, on the images' device.
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        desc = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float (N,C,H,W) tensor in [0, 1], got {desc}")
    if images.shape[0] == 0:
        raise ValueError("images holds no samples (N=0)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images.min() < -1e-6 or images.max() > 1 + 1e-6:
        raise ValueError(
            f"images lie in [{images.min():.4g}, {images.max():.4g}], outside [0, 1]; map [-1, 1] with (x + 1) / 2"
        )
    with torch.no_grad(), _eval_mode(features):
        out = torch.cat([features(batch) for batch in images.split(batch_size)])
    if out.ndim != 2 or out.shape[0] != images.shape[0]:
        raise ValueError(f"feature extractor must return (N, D)=({images.shape[0]}, D), got {tuple(out.shape)}")
    expected = getattr(features, "num_features", None)
    if isinstance(expected, int) and out.shape[1] != expected:
        raise ValueError(f"feature extractor says num_features={expected} but returned D={out.shape[1]}")
    return out


def real_feature_stats(real_images: Tensor, features: nn.Module, batch_size: int = 500) -> Tensor:
    """(N,D) features of the reference set; wrap in :func:`cached_features` to compute them once."""
    return extract_features(real_images, features, batch_size)


def cached_features(key: str, cache_dir: Path, compute: Callable[[], Tensor]) -> Tensor:
    """Return the tensor stored as ``cache_dir/<key>.pt``, or ``compute()`` it and store it.

    ``key`` must name the data *and* the extractor (e.g. ``"mnist-test_flatten"``): a stale key
    silently reuses old features. Saved with ``torch.save``, read with ``weights_only=True``.
    """
    if not re.fullmatch(r"[A-Za-z0-9._-]+", key):
        raise ValueError(f"cache key {key!r} must use only letters, digits, '.', '_' and '-' (it is a file name)")
    path = Path(cache_dir) / f"{key}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
            raise ValueError(f"feature cache {path} is unreadable ({e}); delete it to recompute") from e
        if not isinstance(cached, Tensor):
            raise ValueError(f"feature cache {path} holds a {type(cached).__name__}, not a Tensor; delete it")
        return cached
    value = compute()
    if not isinstance(value, Tensor):
        raise ValueError(f"compute() for cache key {key!r} returned {type(value).__name__}, expected a Tensor")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(value.detach().cpu(), tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written cache behind
    return value


def frechet_distance_from_features(f_real: Tensor, f_fake: Tensor, chunk_size: int = 10_000) -> float:
    """FD between (N_r, D) and (N_f, D) feature sets, accumulated by torchmetrics in float64.

    Needs N >= 2 per set; warns when N < D, where the sample covariance is rank deficient and
    FD is strongly biased upwards (use more samples or a smaller feature space).
    """
    _check_pair(f_real, f_fake)
    d = f_real.shape[1]
    small = min(f_real.shape[0], f_fake.shape[0])
    if small < d:
        warnings.warn(
            f"FD with {small} samples < {d} feature dims: the covariance is rank deficient and the FD is biased "
            "and unstable; use N >= D (ideally N >> D) or a lower-dimensional feature extractor",
            UserWarning,
            stacklevel=2,
        )
    # sync_on_compute=False: the caller hands us the full sets; inside a DDP run torchmetrics would
    # otherwise all-gather and silently mix in other ranks' features.
    metric = FrechetInceptionDistance(feature=_Identity(d), normalize=True, sync_on_compute=False)
    metric = metric.to(f_real.device)
    for f, real in ((f_real, True), (f_fake, False)):
        for chunk in f.split(chunk_size):  # bounds the float64 copy torchmetrics makes
            metric.update(chunk.to(f_real.device, torch.float64), real=real)
    fd = float(metric.compute())
    # FD >= 0 mathematically; torchmetrics' eigvals of S_r S_f can leave ~1e-12 rounding below 0.
    return max(fd, 0.0)


def frechet_distance(real: Tensor, fake: Tensor, features: nn.Module, batch_size: int = 500) -> float:
    """FD between (N,C,H,W) image sets in [0, 1], in the feature space of ``features``."""
    return frechet_distance_from_features(
        extract_features(real, features, batch_size), extract_features(fake, features, batch_size)
    )


def kernel_inception_distance_from_features(
    f_real: Tensor, f_fake: Tensor, subset_size: int = 1000, subsets: int = 100, seed: int = 0
) -> tuple[float, float]:
    """KID (mean, std over ``subsets`` random subsets of ``subset_size``) between (N, D) feature sets.

    ``std`` is the population std over subsets (torchmetrics' convention). Subsets are drawn with
    a generator seeded by ``seed`` so the result is reproducible; the global RNG is left untouched.
    KID is unbiased for *independent* sets; a set against itself scores slightly below 0
    (O(1/subset_size)), because each shared sample adds k(x, x) to the cross term.
    """
    _check_pair(f_real, f_fake)
    n = min(f_real.shape[0], f_fake.shape[0])
    if not 2 <= subset_size <= n:
        raise ValueError(
            f"KID subset_size={subset_size} must be in [2, {n}] (the smaller set has {n} samples); "
            "lower subset_size or provide more samples"
        )
    with warnings.catch_warnings():  # torchmetrics warns that KID buffers all features; we know
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=_Identity(f_real.shape[1]), subsets=subsets, subset_size=subset_size, sync_on_compute=False
        )
    metric.update(f_real.double(), real=True)
    metric.update(f_fake.to(f_real.device, torch.float64), real=False)
    # torchmetrics draws subsets with torch.randperm on the global CPU generator: fork it and seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def kernel_inception_distance(
    real: Tensor,
    fake: Tensor,
    features: nn.Module,
    subset_size: int = 1000,
    subsets: int = 100,
    batch_size: int = 500,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (mean, std) between (N,C,H,W) image sets in [0, 1], in the feature space of ``features``."""
    return kernel_inception_distance_from_features(
        extract_features(real, features, batch_size),
        extract_features(fake, features, batch_size),
        subset_size=subset_size,
        subsets=subsets,
        seed=seed,
    )
