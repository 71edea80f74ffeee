"""Feature extractors for FID/KID, chosen by name: ``get_feature_extractor(name)``.

* ``"classifier"``: our small CNN (:mod:`bdiff.metrics.feature_net`) trained to tell the classes
  of the real training data apart (the digits; for an image folder, its class folders: which photo
  a crop came from), read from the feature cache (default ``$BDIFF_CACHE/features``, else
  ``~/.cache/bdiff/features``): ``digits.pt`` for the digits, ``<data key>_cnn.pt`` for other data.
* ``"classifier_mlp"``: a second classifier of the same classes, built differently (fully
  connected on the pixels, no convolution or normalisation, another seed): ``digits_mlp.pt`` or
  ``<data key>_mlp.pt``.
* ``"digits"`` / ``"digits_mlp"``: the two classifiers' names on the digits (the names every
  digits number is reported under). Create the digits files with ``python -m bdiff.lit.feature_module
  cache``; ``bdiff-evaluate --train-features-if-missing`` trains any missing classifier.
* ``"pixels"``: the raw pixels (64-d for the digits; images over 16x16 are block-averaged to
  16x16 first): no learned feature at all.

One feature space can saturate or be blind to a failure (the digits CNN hid a 4x gap in
sample quality), so :data:`DIGITS_SPACES` / :data:`DATA_SPACES` -- three spaces built
differently -- are what the evaluator and the benchmarks report.
* ``"inception"``: the standard FID Inception-v3 (Heusel et al. 2017; TF-ported weights of
  Szegedy et al. 2016) through torchmetrics' ``NoTrainInceptionV3``, which needs the
  ``torch-fidelity`` package and its weights file. Never downloaded here: when either is
  missing we raise (or, with ``fallback="digits"``, warn and use the digits net).

Every extractor maps images (N, C, H, W) float in [0, 1] to features (N, D) and can be passed
to ``torchmetrics.image.fid.FrechetInceptionDistance(feature=...)``.

The cache file is a plain dict (``format``, ``version``, ``config``, ``state_dict``, ``meta``)
written with ``torch.save`` and read with ``torch.load(weights_only=True)``: a file carrying
pickled objects is refused, never executed. This module only reads the cache: the digits
classifiers are trained by :mod:`bdiff.lit.feature_module` (Lightning), through its ``cache``
command or :func:`~bdiff.lit.feature_module.ensure_feature_nets`.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor

from bdiff.cache import cache_root
from bdiff.files import atomic_file
from bdiff.metrics.feature_net import FeatureExtractor, FeatureNet, FeatureNetConfig

FEATURE_EXTRACTORS = ("digits", "digits_mlp", "classifier", "classifier_mlp", "pixels", "inception")
"""Names :func:`get_feature_extractor` knows."""
DIGITS_SPACES = ("digits", "digits_mlp", "pixels")
"""The feature spaces every digits quality number is reported in."""
DATA_SPACES = ("classifier", "classifier_mlp", "pixels")
"""The feature spaces quality on any other labelled data (an image folder) is reported in."""
DIGITS_KEY = "digits"
"""The data key of scikit-learn's digits (:class:`bdiff.metrics.references.RealData`)."""
CLASSIFIER_ARCH = {"digits": "cnn", "digits_mlp": "mlp", "classifier": "cnn", "classifier_mlp": "mlp"}
"""Classifier feature space -> architecture of its :class:`~bdiff.metrics.feature_net.FeatureNet`."""
DIGITS_FILES = {"cnn": "digits.pt", "mlp": "digits_mlp.pt"}

MAX_PIXEL_SIDE = 16
"""The ``pixels`` space averages larger images down to this many pixels a side (:class:`PixelFeatureExtractor`)."""
FORMAT, VERSION = "bdiff-feature-net", 1
CACHE_COMMAND = "python -m bdiff.lit.feature_module cache"
INCEPTION_FEATURES = 2048  # pool3 features, the FID standard
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name for them


def default_cache_dir() -> Path:
    """``$BDIFF_CACHE/features`` if ``BDIFF_CACHE`` is set, else ``~/.cache/bdiff/features``."""
    return cache_root() / "features"


def save_feature_net(net: FeatureNet, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``net`` (config + state dict + ``meta``) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": asdict(net.config),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "meta": dict(meta or {}),
    }
    with atomic_file(path) as f:
        torch.save(payload, f)
    return path


def load_feature_net(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[FeatureNet, dict[str, Any]]:
    """Read a feature-net file written by :func:`save_feature_net` -> (net in eval mode, meta)."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated file, foreign pickle, ...
        raise ValueError(
            f"cannot read feature net {str(path)!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"Delete it and recreate it with: {CACHE_COMMAND} --cache-dir {path.parent}"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a bdiff feature-net file (format {FORMAT!r}).")
    if payload.get("version") != VERSION:
        raise ValueError(
            f"{str(path)!r} has feature-net format version {payload.get('version')}, this bdiff reads "
            f"version {VERSION}: recreate it with: {CACHE_COMMAND} --cache-dir {path.parent}"
        )
    net = FeatureNet(FeatureNetConfig(**payload["config"]))
    net.load_state_dict(payload["state_dict"])
    return net.eval(), dict(payload.get("meta", {}))


def classifier_path(name: str, cache_dir: Path | None = None, data_key: str = DIGITS_KEY) -> Path:
    """The file of the ``name`` classifier (a key of :data:`CLASSIFIER_ARCH`) of the data ``data_key`` in
    ``cache_dir`` (default :func:`default_cache_dir`)."""
    if name not in CLASSIFIER_ARCH:
        raise ValueError(f"{name!r} is not a classifier feature space ({', '.join(CLASSIFIER_ARCH)})")
    if name.startswith("digits") and data_key != DIGITS_KEY:
        raise ValueError(f"the {name!r} feature space is a classifier of the digits; for other data use "
                         f"{name.replace('digits', 'classifier')!r}")
    arch = CLASSIFIER_ARCH[name]
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return cache_dir / (DIGITS_FILES[arch] if data_key == DIGITS_KEY else f"{data_key}_{arch}.pt")


def cache_command(name: str, cache_dir: Path, data_key: str = DIGITS_KEY) -> str:
    """The command that trains the ``name`` classifier into ``cache_dir``."""
    if data_key != DIGITS_KEY:
        return "bdiff-evaluate --samples <file> --train-features-if-missing (a classifier of the checkpoint's own data)"
    arch = CLASSIFIER_ARCH[name]
    return CACHE_COMMAND + ("" if arch == "cnn" else f" --arch {arch}") + f" --cache-dir {cache_dir}"


def _classifier(name: str, cache_dir: Path | None, device: str | torch.device, data_key: str) -> FeatureExtractor:
    """A cached classifier of the data ``data_key`` (CNN or MLP, by ``name``) as an extractor."""
    path = classifier_path(name, cache_dir, data_key)
    if not path.is_file():
        raise FileNotFoundError(
            f"the {name} feature net {str(path)!r} is missing. Create it with: {cache_command(name, path.parent, data_key)} "
            "(seconds to minutes on a CPU), or let bdiff-evaluate do it: --train-features-if-missing."
        )
    net, _ = load_feature_net(path)
    return FeatureExtractor(net, name=name).to(device)


class PixelFeatureExtractor(FeatureExtractor):
    """The pixels as features: (N, C, H, W) in [0, 1] -> (N, C*h*w), nothing learned.

    Images up to :data:`MAX_PIXEL_SIDE` pixels a side are taken as they are (the digits: 64-d);
    larger ones are first averaged over square blocks down to that side (``adaptive_avg_pool2d``;
    32x32 RGB: 3x16x16 = 768-d), so the Frechet distance's covariance stays estimable from a few
    thousand samples (it needs N > D) while keeping the images' layout and colour.
    """

    def __init__(self, image_shape: tuple[int, int, int]) -> None:
        c, h, w = image_shape
        self.side = (min(h, MAX_PIXEL_SIDE), min(w, MAX_PIXEL_SIDE))
        super().__init__(torch.nn.Flatten(), name="pixels", num_features=c * self.side[0] * self.side[1])
        self.image_shape = tuple(image_shape)

    def extract(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"pixel features were set up for {self.image_shape} images, got {tuple(x.shape[1:])}")
        if tuple(x.shape[2:]) != self.side:
            x = torch.nn.functional.adaptive_avg_pool2d(x, self.side)
        return x.flatten(1)


class InceptionFeatureExtractor(FeatureExtractor):
    """FID Inception-v3 pool3 features (N, 2048) from images (N, 1 or 3, H, W) in [0, 1].

    Images are quantised to uint8 as torchmetrics/torch-fidelity expect (grey images are
    repeated to RGB) and resized to 299x299 inside the network.
    """

    def extract(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"inception features need (N, 1 or 3, H, W) images, got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net((x * 255).round().clamp(0, 255).to(torch.uint8))


def inception_weights_path() -> Path:
    """Where torch-fidelity's ``load_state_dict_from_url`` caches the FID Inception weights.

    Raises ModuleNotFoundError if torch-fidelity is not installed.
    """
    try:
        module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    except ImportError as e:
        raise ModuleNotFoundError(
            "the 'inception' feature extractor needs the torch-fidelity package (the FID Inception-v3 that "
            "torchmetrics uses), which is not installed. Install it with `pip install torch-fidelity` "
            "(or `pip install torchmetrics[image]`), or use get_feature_extractor(..., fallback='digits')."
        ) from e
    url = getattr(module, "URL_INCEPTION_V3", INCEPTION_WEIGHTS_FILE)  # torch-fidelity's download URL
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(str(url)).path)


def _inception(weights: Path | None, device: str | torch.device) -> FeatureExtractor:
    default = inception_weights_path()  # raises if torch-fidelity is missing
    path = Path(weights) if weights is not None else default
    if not path.is_file():
        raise FileNotFoundError(
            f"the FID Inception-v3 weights file {str(path)!r} is missing (bdiff never downloads it). Fetch it "
            "once on a machine with network access, e.g. python -c \"from torchmetrics.image.fid import "
            "NoTrainInceptionV3; NoTrainInceptionV3('inception-v3-compat', ['2048'])\" (it lands in "
            f"{str(default)!r}), and copy it there; or use get_feature_extractor(..., fallback='digits')."
        )
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3("inception-v3-compat", [str(INCEPTION_FEATURES)], feature_extractor_weights_path=str(path))
    return InceptionFeatureExtractor(net, name="inception", num_features=INCEPTION_FEATURES).to(device)


def get_feature_extractor(
    name: str,
    cache_dir: Path | None = None,
    device: str | torch.device = "cpu",
    fallback: str | None = None,
    inception_weights: Path | None = None,
    image_shape: tuple[int, int, int] = (1, 8, 8),
    data_key: str = DIGITS_KEY,
) -> FeatureExtractor:
    """A frozen feature extractor by name: images (N, C, H, W) in [0, 1] -> features (N, D).

    Args:
        name: ``"digits"`` / ``"digits_mlp"`` (D=64, 1x8x8 images), ``"classifier"`` / ``"classifier_mlp"``
            (D=64, the images of ``data_key``), ``"pixels"`` (D=C*H*W of
            ``image_shape``) or ``"inception"`` (D=2048, any size, 1 or 3 channels).
        cache_dir: folder holding ``digits.pt`` / ``digits_mlp.pt`` (default :func:`default_cache_dir`).
        device: where the extractor lives.
        fallback: ``"digits"``: if the inception extractor is unavailable (torch-fidelity or
            its weights missing), warn and return the digits extractor. ``None``: raise.
        inception_weights: the FID Inception weights file (default: torch hub's cache,
            where torch-fidelity downloads it).
        image_shape: (C, H, W) of the images, for ``"pixels"``.
        data_key: which data's classifiers to read (:attr:`bdiff.metrics.references.RealData.key`).

    Raises:
        ValueError: unknown ``name`` or ``fallback``.
        FileNotFoundError: ``digits.pt`` or the Inception weights are missing (the message gives the
            command that makes them; :func:`bdiff.lit.feature_module.ensure_feature_nets` trains a
            missing digits classifier in process).
        ModuleNotFoundError: ``"inception"`` without torch-fidelity installed.

    Example:
        >>> ext = get_feature_extractor("digits")  # after python -m bdiff.lit.feature_module cache
        >>> ext(torch.rand(16, 1, 8, 8)).shape
        torch.Size([16, 64])
    """
    if name not in FEATURE_EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; known names: {', '.join(FEATURE_EXTRACTORS)}")
    if fallback is not None and (fallback not in FEATURE_EXTRACTORS or fallback == name):
        others = [n for n in FEATURE_EXTRACTORS if n != name]
        raise ValueError(f"fallback must be None or one of {', '.join(others)}, got {fallback!r}")
    if name in CLASSIFIER_ARCH:
        return _classifier(name, cache_dir, device, data_key)
    if name == "pixels":
        return PixelFeatureExtractor(image_shape).to(device)
    try:
        return _inception(inception_weights, device)
    except (ImportError, FileNotFoundError) as e:
        if fallback is None:
            raise
        warnings.warn(
            f"inception feature extractor unavailable, falling back to {fallback!r} (scores computed with "
            f"different feature extractors are not comparable). Reason: {e}",
            RuntimeWarning,
            stacklevel=2,
        )
        return get_feature_extractor(fallback, cache_dir, device, image_shape=image_shape, data_key=data_key)
