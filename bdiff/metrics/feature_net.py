"""A small CNN classifier whose penultimate layer is a feature space for FID/KID on small images.

FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) compare two image sets through the
features of a classifier; the standard one is Inception-v3 (Szegedy et al. 2016), trained on
ImageNet at 299x299. For 8x8 digits an ImageNet net sees almost nothing, so, as is common for
MNIST-scale data, we train a small in-domain classifier and use its penultimate layer.

Two architectures, so that a score cannot be fooled by one feature space: ``arch="cnn"``
(convolutions, BatchNorm, pooling; the ``digits`` features) and ``arch="mlp"`` (a fully
connected net on the raw pixels, no convolution or normalisation; the ``digits_mlp``
features, trained from another seed).

``FeatureNet(x) -> logits (N, 10)`` and ``FeatureNet.features(x) -> (N, D)``, for images
``x`` of shape ``(N, C, H, W)``, float in ``[0, 1]``. :class:`FeatureExtractor` wraps a frozen
net so that its ``forward`` returns features and it has ``num_features``: the form
``torchmetrics``' ``FrechetInceptionDistance(feature=...)`` / ``KernelInceptionDistance`` take.

Plain ``nn.Module`` s: training lives in :mod:`bdiff.lit.feature_module`, loading by name in
:mod:`bdiff.metrics.features`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from bdiff.checks import as_integer


@dataclass
class FeatureNetConfig:
    """Shape of :class:`FeatureNet` (saved beside its weights, so a cached net rebuilds itself).

    Attributes:
        in_channels: image channels C the net is trained on (1 grey, 3 RGB).
        image_size: height = width of the training images (8 for sklearn digits, 28 for MNIST).
        num_classes: classifier outputs (10 digits).
        width: channels of the first conv; later convs have ``2 * width``.
        num_features: D, the size of the penultimate (feature) layer.
        dropout: dropout before the classifier layer (training only).
        arch: ``cnn`` (conv-BN-ReLU body) or ``mlp`` (two hidden fully connected layers of
            ``8 * width`` units on the flattened pixels).
    """

    in_channels: int = 1
    image_size: int = 8
    num_classes: int = 10
    width: int = 32
    num_features: int = 64
    dropout: float = 0.1
    arch: Literal["cnn", "mlp"] = "cnn"

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        for name in ("in_channels", "image_size", "num_classes", "width", "num_features"):
            as_integer(f"feature net {name}", getattr(self, name), 1)
        if self.image_size < 4:
            raise ValueError(f"feature net image_size must be >= 4 (it pools by 2), got {self.image_size}")
        if self.num_classes < 2:
            raise ValueError(f"feature net num_classes must be >= 2, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"feature net dropout must be in [0, 1), got {self.dropout}")
        if self.arch not in ("cnn", "mlp"):
            raise ValueError(f"feature net arch must be 'cnn' or 'mlp', got {self.arch!r}")


class FeatureNet(nn.Module):
    """Small classifier whose penultimate layer gives the features.

    ``arch="cnn"``: conv-BN-ReLU x3 with one 2x max-pool, 2x2 average pool, MLP. Shapes
    (defaults, 1x8x8 digits): (N,1,8,8) -> (N,32,8,8) -> (N,64,4,4) -> (N,64,2,2)
    -> features (N,64) -> logits (N,10). ``arch="mlp"``: (N,1,8,8) -> (N,64) -> (N,256)
    -> (N,256) -> features (N,64) -> logits (N,10). Any ``image_size >= 4`` works (the adaptive pool
    fixes the flattened size), but a net only makes sense for the size it was trained on,
    so inputs of another shape are refused.

    Example:
        >>> net = FeatureNet(FeatureNetConfig(in_channels=1, image_size=8))
        >>> net.features(torch.rand(5, 1, 8, 8)).shape
        torch.Size([5, 64])
    """

    def __init__(self, config: FeatureNetConfig = FeatureNetConfig()) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.num_features = config.num_features
        if config.arch == "mlp":
            pixels, hidden = config.in_channels * config.image_size**2, 8 * config.width
            self.body = nn.Sequential(
                nn.Flatten(),
                nn.Linear(pixels, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, config.num_features),
                nn.ReLU(),
            )
        else:
            self.body = self._cnn_body(config)
        self.classifier = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.num_features, config.num_classes))

    @staticmethod
    def _cnn_body(config: FeatureNetConfig) -> nn.Sequential:
        w = config.width

        def conv(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        return nn.Sequential(
            *conv(config.in_channels, w),
            *conv(w, 2 * w),
            nn.MaxPool2d(2),
            *conv(2 * w, 2 * w),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * w * 4, config.num_features),
            nn.ReLU(),
        )

    def check_input(self, x: Tensor) -> None:
        """Raise ValueError unless ``x`` is a float (N, C, H, W) batch of the trained C and size."""
        c, s = self.config.in_channels, self.config.image_size
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(
                f"feature net expects a float batch (N, {c}, {s}, {s}) in [0, 1], got shape {tuple(x.shape)} "
                f"and dtype {x.dtype}"
            )
        if tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(
                f"this feature net was trained on {c}x{s}x{s} images but got {x.shape[1]}x{x.shape[2]}x{x.shape[3]}: "
                f"features of another image shape mean nothing. Use a feature net trained for "
                f"{x.shape[1]}x{x.shape[2]}x{x.shape[3]} images (e.g. MNIST's 1x28x28 needs "
                "FeatureNetConfig(in_channels=1, image_size=28) trained on MNIST), or resize the images."
            )

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features: x (N, C, H, W) in [0, 1] -> (N, num_features), >= 0."""
        self.check_input(x)
        return self.body(x * 2.0 - 1.0)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits: x (N, C, H, W) in [0, 1] -> (N, num_classes)."""
        return self.classifier(self.features(x))


def check_unit_range(x: Tensor, tol: float = 1e-3) -> None:
    """Raise ValueError unless every value of ``x`` lies in [0, 1] (up to ``tol``); names the fix."""
    if x.numel() == 0:
        raise ValueError("feature extractor got an empty batch")
    lo, hi = float(x.min()), float(x.max())
    if not (lo >= -tol and hi <= 1.0 + tol):  # also catches NaN
        raise ValueError(
            f"feature extractors take images in [0, 1], got values in [{lo:.3g}, {hi:.3g}]. "
            "Map bdiff samples from [-1, 1] with (x + 1) / 2 (and clamp to [0, 1])."
        )


class FeatureExtractor(nn.Module):
    """A frozen feature network: ``forward(x) -> (N, num_features)`` for x (N, C, H, W) in [0, 1].

    Always in eval mode (``train()`` is a no-op, as torchmetrics' ``NoTrainInceptionV3``) and
    without gradients. Pass it to torchmetrics as a custom feature extractor:

    Example:
        >>> from torchmetrics.image.fid import FrechetInceptionDistance
        >>> ext = FeatureExtractor(FeatureNet(), name="digits")
        >>> fid = FrechetInceptionDistance(feature=ext)  # update(images_in_0_1, real=...)

    Args:
        net: the feature network; ``extract`` calls ``net.features`` (override it otherwise).
        name: the name it is known by in :func:`bdiff.metrics.features.get_feature_extractor`.
        num_features: D; default ``net.num_features``.
    """

    def __init__(self, net: nn.Module, name: str, num_features: int | None = None) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.name = name
        self.num_features = int(num_features if num_features is not None else net.num_features)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stay in eval mode (BatchNorm statistics and dropout are frozen)."""
        return super().train(False)

    def extract(self, x: Tensor) -> Tensor:
        """Features of a checked batch: (N, C, H, W) in [0, 1] -> (N, num_features)."""
        return self.net.features(x)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) float in [0, 1] -> features (N, num_features)."""
        check_unit_range(x)
        return self.extract(x)

    @property
    def is_classifier(self) -> bool:
        """True when the wrapped net also gives class logits (``net(x)``), e.g. a :class:`FeatureNet`."""
        return isinstance(self.net, FeatureNet)

    @torch.no_grad()
    def confidence(self, x: Tensor) -> Tensor:
        """Max softmax probability of the classifier: (N, C, H, W) in [0, 1] -> (N,). Only for classifiers."""
        if not self.is_classifier:
            raise TypeError(f"feature extractor {self.name!r} is not a classifier")
        check_unit_range(x)
        return torch.softmax(self.net(x), dim=-1).amax(-1)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_features={self.num_features}"
