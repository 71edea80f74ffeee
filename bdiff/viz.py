"""Image grids of samples beside their per-pixel uncertainty (torchvision only)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import make_grid, save_image


def uncertainty_grids(images: Tensor, variance: Tensor, nrow: int, upscale: int = 4) -> tuple[Tensor, Tensor]:
    """Samples in [-1,1] and their variance (B,C,H,W) -> two (3,H',W') grids in [0,1].

    The std map is stretched over the batch: black is the least uncertain pixel,
    white the 99th percentile and above (so a few outliers do not darken the rest).
    """
    x = (images.float().cpu() + 1) / 2
    std = variance.float().cpu().clamp_min(0).sqrt()
    lo, hi = std.min(), torch.quantile(std.flatten(), 0.99)
    std = ((std - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    if upscale > 1:
        x = F.interpolate(x, scale_factor=upscale, mode="nearest")
        std = F.interpolate(std, scale_factor=upscale, mode="nearest")
    if std.shape[1] > 1:
        std = std.mean(1, keepdim=True)
    return make_grid(x, nrow=nrow, pad_value=1.0), make_grid(std, nrow=nrow, pad_value=1.0)


def save_side_by_side(path: str | Path, samples: Tensor, uncertainty: Tensor, gap: int = 8) -> Path:
    """Write ``samples | uncertainty`` grids (each (C,H,W) in [0,1]) as one PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spacer = torch.ones(3, samples.shape[1], gap)
    save_image(torch.cat([samples.expand(3, -1, -1), spacer, uncertainty.expand(3, -1, -1)], dim=2), path)
    return path
