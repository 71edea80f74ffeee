"""Sample-quality metrics against known answers: FD/KID, precision/recall, uncertainty usefulness,
and the samples file's round trip and error messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from bdiff.metrics.frechet import (
    cached_features,
    frechet_distance,
    frechet_distance_from_features,
    kernel_inception_distance,
    kernel_inception_distance_from_features,
    real_feature_stats,
)
from bdiff.metrics.precision_recall import precision_recall
from bdiff.metrics.samples_file import SampleSet, load_samples, save_samples
from bdiff.metrics.usefulness import (
    auroc_worst,
    fd_after_filtering,
    nearest_real_distance,
    per_sample_uncertainty,
    spearman,
)


class FlatFeatures(nn.Flatten):
    """Pixel-space "feature extractor" for (N,1,2,2) images: (N, 4) features."""

    num_features = 4


def gaussian(n: int, mean: Tensor, std: Tensor, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return mean + std * torch.randn(n, mean.shape[0], generator=g, dtype=torch.float64)


# ---------------------------------------------------------------- Fréchet distance and KID


def test_fd_identical_sets_is_zero() -> None:
    f = gaussian(500, torch.zeros(6), torch.ones(6), seed=0)
    assert frechet_distance_from_features(f, f) == pytest.approx(0.0, abs=1e-8)


def test_fd_mean_shift_matches_squared_norm() -> None:
    d, n = 8, 20_000
    mu = torch.full((d,), 0.5)  # |mu|^2 = 2
    fd = frechet_distance_from_features(gaussian(n, torch.zeros(d), torch.ones(d), 0), gaussian(n, mu, torch.ones(d), 1))
    assert fd == pytest.approx(2.0, abs=0.05)


def test_fd_diagonal_covariances_match_closed_form() -> None:
    d, n = 5, 40_000
    s1, s2 = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0]), torch.tensor([0.25, 2.0, 2.0, 1.0, 4.0])  # variances
    mu = torch.tensor([1.0, 0.0, -1.0, 0.0, 0.5])
    expected = (mu**2).sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum()
    fd = frechet_distance_from_features(gaussian(n, torch.zeros(d), s1.sqrt(), 2), gaussian(n, mu, s2.sqrt(), 3))
    assert fd == pytest.approx(expected.item(), rel=0.03)


def test_fd_and_kid_grow_with_shift_on_images() -> None:
    g = torch.Generator().manual_seed(4)
    real = 0.1 + 0.3 * torch.rand(400, 1, 2, 2, generator=g)  # in [0.1, 0.4]
    fake = 0.1 + 0.3 * torch.rand(400, 1, 2, 2, generator=g)
    fds, kids = [], []
    for shift in (0.0, 0.2, 0.5):
        fds.append(frechet_distance(real, fake + shift, FlatFeatures(), batch_size=128))
        kids.append(kernel_inception_distance(real, fake + shift, FlatFeatures(), subset_size=100, subsets=20)[0])
    assert fds[0] < 0.01 and fds[0] < fds[1] < fds[2]
    assert abs(kids[0]) < 1e-3 and kids[0] < kids[1] < kids[2]
    assert fds[2] == pytest.approx(4 * 0.5**2, rel=0.05)  # mean shift of 0.5 in 4 pixels


def test_kid_identical_sets_is_near_zero_and_reproducible() -> None:
    f = gaussian(600, torch.zeros(4), torch.ones(4), seed=5)
    same_law = gaussian(600, torch.zeros(4), torch.ones(4), seed=6)
    shifted = gaussian(600, torch.full((4,), 0.3), torch.ones(4), seed=6)
    shifted_kid, _ = kernel_inception_distance_from_features(f, shifted, subset_size=300, subsets=20)
    # The unbiased MMD^2 of a set with itself is O(1/m) *negative* (k(x, x) enters the cross term).
    self_kid, std = kernel_inception_distance_from_features(f, f, subset_size=300, subsets=20)
    same_kid, _ = kernel_inception_distance_from_features(f, same_law, subset_size=300, subsets=20)
    assert shifted_kid > 0.2 and abs(self_kid) < 0.1 * shifted_kid and abs(same_kid) < 0.05 * shifted_kid
    assert std >= 0
    assert kernel_inception_distance_from_features(f, f + 1, subset_size=50, subsets=5, seed=7) == (
        kernel_inception_distance_from_features(f, f + 1, subset_size=50, subsets=5, seed=7)
    )


def test_fd_kid_bad_inputs() -> None:
    f = torch.randn(10, 3)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance_from_features(f[:1], f)
    with pytest.raises(ValueError, match="feature dims differ"):
        frechet_distance_from_features(f, torch.randn(10, 4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance_from_features(f, torch.full((10, 3), float("nan")))
    with pytest.warns(UserWarning, match="feature dims"):
        frechet_distance_from_features(torch.randn(5, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="subset_size=20"):
        kernel_inception_distance_from_features(f, f, subset_size=20)
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        frechet_distance(torch.rand(4, 1, 2, 2) * 2, torch.rand(4, 1, 2, 2), FlatFeatures())
    with pytest.raises(ValueError, match="num_features=5"):

        class Wrong(FlatFeatures):
            num_features = 5

        frechet_distance(torch.rand(4, 1, 2, 2), torch.rand(4, 1, 2, 2), Wrong())


def test_feature_extraction_restores_mode_and_cache(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Flatten(), nn.Dropout(0.5)).train()
    images = torch.rand(6, 1, 2, 2)
    feats = real_feature_stats(images, net, batch_size=4)
    assert net.training and torch.equal(feats, images.flatten(1))  # eval during extraction, restored after
    calls = []

    def compute() -> Tensor:
        calls.append(1)
        return feats

    first = cached_features("digits_flat", tmp_path / "cache", compute)
    second = cached_features("digits_flat", tmp_path / "cache", compute)
    assert len(calls) == 1 and torch.equal(first, second)
    with pytest.raises(ValueError, match="cache key"):
        cached_features("../escape", tmp_path, compute)
    (tmp_path / "cache" / "junk.pt").write_text("not a tensor")
    with pytest.raises(ValueError, match="delete it"):
        cached_features("junk", tmp_path / "cache", compute)


# ---------------------------------------------------------------- precision and recall


def test_precision_recall_known_cases() -> None:
    real = gaussian(400, torch.zeros(3), torch.ones(3), seed=6)
    assert precision_recall(real, real) == (1.0, 1.0)

    far = gaussian(400, torch.full((3,), 100.0), torch.ones(3), seed=7)
    assert precision_recall(real, far) == (0.0, 0.0)

    # fake = a fresh draw of the real distribution + 20% far outliers (a tight cluster of their own).
    good = gaussian(320, torch.zeros(3), torch.ones(3), seed=8)
    outliers = gaussian(80, torch.full((3,), 50.0), torch.ones(3), seed=9)
    precision, recall = precision_recall(real, torch.cat([good, outliers]), k=3, chunk_size=64)
    baseline, _ = precision_recall(real, gaussian(400, torch.zeros(3), torch.ones(3), seed=8))
    assert precision == pytest.approx(0.8 * baseline, abs=0.03)
    assert recall > 0.9


def test_precision_recall_bad_k() -> None:
    f = torch.randn(5, 2)
    with pytest.raises(ValueError, match="k=5"):
        precision_recall(f, torch.randn(50, 2), k=5)
    with pytest.raises(ValueError, match="positive"):
        precision_recall(f, f, k=0)


# ---------------------------------------------------------------- usefulness of uncertainty


def outlier_features(seed: int = 10) -> tuple[Tensor, Tensor, Tensor]:
    """Real features, fake features whose last 20% are far outliers, and u marking them."""
    real = gaussian(1000, torch.zeros(4), torch.ones(4), seed)
    good = gaussian(800, torch.zeros(4), torch.ones(4), seed + 1)
    bad = gaussian(200, torch.full((4,), 6.0), torch.ones(4), seed + 2)
    fake = torch.cat([good, bad])
    u = torch.cat([torch.rand(800), 1 + torch.rand(200)])
    return real, fake, u


def test_uncertainty_equal_to_quality_is_perfect() -> None:
    real, fake, _ = outlier_features()
    q = nearest_real_distance(fake, real, chunk_size=100)
    assert q.shape == (1000,) and (q >= 0).all()
    assert auroc_worst(q, q) == 1.0 and spearman(q, q) == pytest.approx(1.0)


def test_random_uncertainty_is_chance() -> None:
    g = torch.Generator().manual_seed(11)
    q, u = torch.rand(4000, generator=g), torch.rand(4000, generator=g)
    assert auroc_worst(u, q, fraction=0.2) == pytest.approx(0.5, abs=0.04)
    assert abs(spearman(u, q)) < 0.05


def test_dropping_uncertain_beats_dropping_random() -> None:
    real, fake, u = outlier_features()
    res = fd_after_filtering(real, fake, u, drop=0.2, seeds=range(3))
    assert res["n_kept"] == 800
    assert res["fd_drop_uncertain"] < 0.1 < res["fd_drop_random_mean"] - 3 * res["fd_drop_random_std"]
    assert res["fd_drop_random_mean"] < res["fd_all"]


def test_usefulness_bad_inputs() -> None:
    var = torch.rand(3, 1, 2, 2)
    torch.testing.assert_close(per_sample_uncertainty(var), var.mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="variance"):
        per_sample_uncertainty(-var)
    with pytest.raises(ValueError, match="equal length"):
        spearman(torch.rand(3), torch.rand(4))
    with pytest.raises(ValueError, match="constant"):
        spearman(torch.ones(5), torch.rand(5))
    with pytest.raises(ValueError, match="fraction"):
        auroc_worst(torch.rand(5), torch.rand(5), fraction=0.01)
    with pytest.raises(ValueError, match="u has 3"):
        fd_after_filtering(torch.randn(10, 2), torch.randn(10, 2), torch.rand(3))


# ---------------------------------------------------------------- samples file


def sample_set(variance: bool = True) -> SampleSet:
    images = torch.rand(3, 1, 4, 4)
    return SampleSet(images, torch.rand(3, 1, 4, 4) * 0.01 if variance else None, 12.5, 0.75, {"sampler": "ddim", "eta": 0.0})


@pytest.mark.parametrize("variance", [True, False])
def test_samples_round_trip(tmp_path: Path, variance: bool) -> None:
    s = sample_set(variance)
    path = tmp_path / "deep" / "run" / "samples.npz"
    save_samples(path, s)
    assert sorted(p.name for p in path.parent.iterdir()) == ["samples.npz"]  # no temp file left behind
    back = load_samples(path)
    assert torch.equal(back.images, s.images) and back.images.dtype == torch.float32
    assert (back.variance is None) == (not variance)
    if variance:
        assert torch.equal(back.variance, s.variance)
    assert (back.nfe, back.seconds, back.config) == (12.5, 0.75, s.config)
    with np.load(path, allow_pickle=False) as npz:
        assert npz["nfe"].dtype == np.float64 and npz["nfe"].shape == ()


def write_npz(path: Path, **overrides: object) -> Path:
    arrays: dict[str, object] = {
        "images": np.random.rand(3, 1, 4, 4).astype(np.float32),
        "variance": np.full((3, 1, 4, 4), 0.01, dtype=np.float32),
        "nfe": np.float64(10),
        "seconds": np.float64(1.0),
        "config": np.asarray(json.dumps({"sampler": "ddim"})),
    }
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def nan_images() -> np.ndarray:
    a = np.random.rand(3, 1, 4, 4).astype(np.float32)
    a[0, 0, 0, 0] = np.nan
    return a


BAD_FILES = {
    "missing images": ({"images": None}, "images"),
    "missing config": ({"config": None}, "config"),
    "images ndim": ({"images": np.random.rand(3, 16).astype(np.float32)}, "'images' must have shape"),
    "images dtype": ({"images": np.random.rand(3, 1, 4, 4)}, "'images' must be float32"),
    "images range": ({"images": np.full((3, 1, 4, 4), 1.01, dtype=np.float32)}, "'images' values"),
    "images nan": ({"images": nan_images()}, "'images' contains NaN"),
    "variance shape": ({"variance": np.zeros((3, 1, 4, 5), dtype=np.float32)}, "'variance' shape"),
    "variance negative": ({"variance": np.full((3, 1, 4, 4), -0.1, dtype=np.float32)}, "'variance' has negative"),
    "variance dtype": ({"variance": np.zeros((3, 1, 4, 4), dtype=np.float16)}, "'variance' must be float32"),
    "nfe zero": ({"nfe": np.float64(0)}, "'nfe' must be finite and > 0"),
    "nfe vector": ({"nfe": np.ones(3)}, "'nfe' must be a numeric scalar"),
    "seconds nan": ({"seconds": np.float64(np.nan)}, "'seconds'"),
    "config json": ({"config": np.asarray("{not json")}, "'config' is not valid JSON"),
    "config list": ({"config": np.asarray("[1, 2]")}, "'config' must be a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_load_rejects_bad_files(tmp_path: Path, case: str) -> None:
    overrides, message = BAD_FILES[case]
    path = write_npz(tmp_path / "samples.npz", **overrides)
    with pytest.raises(ValueError, match=message):
        load_samples(path)


def test_load_missing_or_foreign_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_samples(tmp_path / "nope.npz")
    np.save(tmp_path / "arr.npy", np.zeros(3))
    with pytest.raises(ValueError, match="not a samples .npz"):
        load_samples(tmp_path / "arr.npy")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ValueError, match="not a readable"):
        load_samples(tmp_path / "junk.npz")


def test_save_rejects_bad_sets(tmp_path: Path) -> None:
    good = sample_set()
    with pytest.raises(ValueError, match="'images' values"):
        save_samples(tmp_path / "a.npz", SampleSet(good.images * 2 - 1, None, 10.0, 1.0, {}))
    with pytest.raises(ValueError, match="uint8"):
        save_samples(tmp_path / "a.npz", SampleSet((good.images * 255).byte(), None, 10.0, 1.0, {}))
    with pytest.raises(ValueError, match="config"):
        save_samples(tmp_path / "a.npz", SampleSet(good.images, None, 10.0, 1.0, {"f": object()}))
    assert not list(tmp_path.iterdir())  # nothing written for a bad set


def test_uncertainty_within_clusters_keeps_the_mix_of_modes_when_filtering() -> None:
    """Two look-alike groups (all-dark and all-bright images); the bright ones are all more uncertain.
    A raw ranking drops only bright images; ranking within clusters drops the noisiest of each group."""
    from bdiff.metrics.usefulness import filter_by_uncertainty, uncertainty_within_clusters

    g = torch.Generator().manual_seed(0)
    images = torch.cat([0.1 * torch.rand(100, 1, 4, 4, generator=g), 0.9 + 0.1 * torch.rand(100, 1, 4, 4, generator=g)])
    noise = torch.rand(200, generator=g)
    variance = (torch.cat([torch.zeros(100), torch.ones(100)]) + 0.5 * noise).view(200, 1, 1, 1).expand(200, 1, 4, 4)
    bright = torch.arange(200) >= 100
    raw_kept = filter_by_uncertainty(variance, keep=0.75)
    assert bright[raw_kept].sum() == 50  # the raw ranking drops 50 bright images and no dark one
    kept = filter_by_uncertainty(variance, keep=0.75, images=images)  # 4 clusters of ~50 look-alikes
    assert 72 <= bright[kept].sum() <= 78  # about 25 dropped from each group
    score = uncertainty_within_clusters(images, variance, clusters=2)
    for group in (bright, ~bright):  # within a group, the order is the order of the variance
        order = score[group].argsort()
        assert torch.equal(order, noise[group].argsort())
    with pytest.raises(ValueError, match="samples"):
        uncertainty_within_clusters(images[:5], variance)


def test_the_per_sample_score_round_trips_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    images, variance = torch.rand(6, 1, 4, 4), torch.rand(6, 1, 4, 4)
    score = torch.linspace(0, 1, 6)
    save_samples(tmp_path / "s.npz", SampleSet(images, variance, 5.0, 1.0, {}, score))
    torch.testing.assert_close(load_samples(tmp_path / "s.npz").score, score)
    with pytest.raises(ValueError, match=r"'score' must be finite float32 of shape \(N,\)"):
        save_samples(tmp_path / "bad.npz", SampleSet(images, variance, 5.0, 1.0, {}, torch.rand(5)))
    assert not (tmp_path / "bad.npz").exists()
