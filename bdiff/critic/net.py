"""Time-conditioned critic: is x_t a forward-noised real image or a forward-noised sample?

``CriticNet(x_t, t) -> logit (B,)``: the logit of a discriminator d(x_t, t) trained with
binary cross-entropy on real x_t ~ q(x_t | x_0 real) (label 1) against generated
x_t ~ q(x_t | x_0 from our sampler) (label 0) at the same t, as in Discriminator Guidance
(Kim et al., ICML 2023, eq. 6). At the optimum the logit is log p_data_t(x_t) - log p_model_t(x_t),
so its input gradient is the score correction the sampler adds (see
:mod:`bdiff.sampler_callbacks.critic`).

Kim et al. put a small head on a frozen pretrained noisy classifier (ADM); for the 8x8..32x32
images bdiff targets a small network trained from scratch is cheaper than a classifier of
that size, and its input gradient costs less than one denoiser call. Plain ``nn.Module``;
training lives in :mod:`bdiff.lit.critic_module`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bdiff.checks import as_integer
from bdiff.nets.blocks import Downsample, ResBlock, group_norm, timestep_embedding


@dataclass
class CriticConfig:
    """Shape of :class:`CriticNet` (saved in the checkpoint, so a critic rebuilds itself).

    Attributes:
        image_size: height = width of the images (divisible by 2**(levels-1)).
        in_channels: image channels (1 grey, 3 RGB).
        width: channels of the first level; level i has ``width * 2**i``.
        levels: resolution levels (one residual block each, a 2x downsample between).
        dropout: dropout inside the residual blocks.
    """

    image_size: int = 8
    in_channels: int = 1
    width: int = 32
    levels: int = 2
    dropout: float = 0.1

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        for name in ("image_size", "in_channels", "width", "levels"):
            as_integer(f"critic net.{name}", getattr(self, name), 1)
        if self.width % 8:
            raise ValueError(f"critic net.width must be a multiple of 8, got {self.width}")
        factor = 2 ** (self.levels - 1)
        if self.image_size % factor:
            raise ValueError(
                f"critic net.image_size={self.image_size} must be divisible by 2**(levels-1)={factor}; use fewer levels"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"critic net.dropout must be in [0, 1), got {self.dropout}")


class CriticNet(nn.Module):
    """Conv in, [ResBlock, downsample] x levels, GN-SiLU, global average pool, linear -> logit.

    Example:
        >>> net = CriticNet(CriticConfig(image_size=8))
        >>> net(torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])).shape
        torch.Size([4])
    """

    def __init__(self, config: CriticConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        w, emb_dim = config.width, 4 * config.width
        self.time_embed = nn.Sequential(nn.Linear(w, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(config.in_channels, w, 3, padding=1)
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        ch = w
        for level in range(config.levels):
            out = w * 2**level
            self.blocks.append(ResBlock(ch, out, emb_dim, config.dropout))
            self.downs.append(Downsample(out) if level < config.levels - 1 else nn.Identity())
            ch = out
        self.norm_out = group_norm(ch)
        self.out = nn.Linear(ch, 1)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """x_t (B,C,H,W) in the diffusion scale, integer t (B,) -> logit (B,)."""
        c, s = self.config.in_channels, self.config.image_size
        if x_t.dim() != 4 or tuple(x_t.shape[1:]) != (c, s, s):
            raise ValueError(f"critic expects images of shape (B,{c},{s},{s}), got {tuple(x_t.shape)}")
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"critic expects one timestep per image, t of shape ({x_t.shape[0]},), got {tuple(t.shape)}")
        emb = self.time_embed(timestep_embedding(t, self.config.width))
        h = self.conv_in(x_t)
        for block, down in zip(self.blocks, self.downs):
            h = down(block(h, emb))
        h = torch.nn.functional.silu(self.norm_out(h)).mean(dim=(2, 3))
        return self.out(h).squeeze(1)
