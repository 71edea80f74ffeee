"""The U-Net's head at fixed weights, for posteriors that read a point-valued trunk (the bottleneck GP).

A model whose only Bayesian layers are the head has one trunk (its weights are plain values), so
the trunk's features of an image are one tensor and the head can be evaluated on them at its
posterior-mean weights: :func:`head_at`. :func:`require_point_trunk` refuses other models.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from bdiff.bayes.model import BayesianUNet


def require_point_trunk(model: BayesianUNet, who: str) -> None:
    """ValueError unless the model's only Bayesian layers are the head (``who`` reads the trunk at its point values)."""
    outside = [n for n in model.bayesian_names if not n.startswith("head.")]
    if outside:
        raise ValueError(
            f"{who} needs a model whose only Bayesian layers are the head; {outside[:3]} are Bayesian too "
            "(train with bayes.layers: head, the default"
            + (f", or set {who}: false)" if who.startswith("model.") else ")")
        )


def head_at(net: nn.Module, weights: dict[str, Tensor], h: Tensor) -> tuple[Tensor, Tensor]:
    """The head at the posterior-mean ``weights`` (its own where not Bayesian): h -> eps, log_var (B,C,H,W) each."""
    w = weights.get("head.weight", net.head.weight)
    b = weights.get("head.bias", net.head.bias)
    return F.conv2d(h, w, b, padding=net.head.padding).chunk(2, dim=1)
