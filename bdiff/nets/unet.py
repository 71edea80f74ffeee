"""U-Net noise predictor with an aleatoric variance head.

``UNet(x_t, t) -> (eps_mean, log_var)``, both (B,C,H,W): the noise prediction
and the per-pixel log-variance of the noise around it. The network is split
into ``features(x_t, t) -> h`` and a final conv ``head(h)`` so that a
Bayesian head can be evaluated for many weight samples on shared features.
Architecture after Ho et al. 2020 / Nichol & Dhariwal 2021 (improved-diffusion).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bdiff.nets.blocks import Downsample, ResBlock, SelfAttention, Upsample, group_norm, timestep_embedding


@dataclass
class UNetConfig:
    """Shape of the U-Net.

    Attributes:
        image_size: height = width of the images, divisible by 2**(len(channel_mults)-1).
        in_channels: image channels (1 grey, 3 RGB); the output has as many.
        base_channels: channels at full resolution.
        channel_mults: channel multiplier per resolution level (one level per entry).
        num_res_blocks: residual blocks per level on the way down.
        attention_resolutions: resolutions (in pixels) that get self-attention.
        num_heads: attention heads.
        dropout: dropout inside residual blocks.
    """

    image_size: int = 8
    in_channels: int = 1
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (4,)
    num_heads: int = 4
    dropout: float = 0.0

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        levels = len(self.channel_mults)
        if levels < 1 or any(m < 1 for m in self.channel_mults):
            raise ValueError(f"net.channel_mults must be positive integers, got {self.channel_mults}")
        if self.in_channels < 1:
            raise ValueError(f"net.in_channels must be >= 1, got {self.in_channels}")
        if self.base_channels < 8 or self.base_channels % 8:
            raise ValueError(f"net.base_channels must be a multiple of 8, got {self.base_channels}")
        if self.num_res_blocks < 1:
            raise ValueError(f"net.num_res_blocks must be >= 1, got {self.num_res_blocks}")
        factor = 2 ** (levels - 1)
        if self.image_size < factor or self.image_size % factor:
            raise ValueError(
                f"net.image_size={self.image_size} must be divisible by 2**(len(channel_mults)-1)={factor}; "
                "use fewer channel_mults or another image_size"
            )
        resolutions = {self.image_size // 2**i for i in range(levels)}
        bad = sorted(set(self.attention_resolutions) - resolutions)
        if bad:
            raise ValueError(
                f"net.attention_resolutions {bad} are not resolutions of this U-Net {sorted(resolutions)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"net.dropout must be in [0, 1), got {self.dropout}")


class UNet(nn.Module):
    """Noise-prediction U-Net: (x_t (B,C,H,W), t (B,)) -> (eps (B,C,H,W), log_var (B,C,H,W)).

    Example:
        >>> net = UNet(UNetConfig(image_size=8, in_channels=1))
        >>> eps, log_var = net(torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,)))
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        base, emb_dim = config.base_channels, 4 * config.base_channels
        self.time_embed = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(config.in_channels, base, 3, padding=1)

        def block(in_ch: int, out_ch: int, res: int) -> nn.ModuleList:
            layers: list[nn.Module] = [ResBlock(in_ch, out_ch, emb_dim, config.dropout)]
            if res in config.attention_resolutions:
                layers.append(SelfAttention(out_ch, config.num_heads))
            return nn.ModuleList(layers)

        ch, res = base, config.image_size
        skip_channels = [ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(config.channel_mults):
            for _ in range(config.num_res_blocks):
                self.down.append(block(ch, base * mult, res))
                ch = base * mult
                skip_channels.append(ch)
            if level < len(config.channel_mults) - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                res //= 2
                skip_channels.append(ch)
        self.mid = nn.ModuleList(
            [
                ResBlock(ch, ch, emb_dim, config.dropout),
                SelfAttention(ch, config.num_heads),
                ResBlock(ch, ch, emb_dim, config.dropout),
            ]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mults))):
            for _ in range(config.num_res_blocks + 1):
                self.up.append(block(ch + skip_channels.pop(), base * mult, res))
                ch = base * mult
            if level > 0:
                self.up.append(nn.ModuleList([Upsample(ch)]))
                res *= 2
        self.out_norm = group_norm(ch)
        self.head = nn.Conv2d(ch, 2 * config.in_channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)  # start at eps=0, log_var=0 (improved-diffusion zero-init)
        nn.init.zeros_(self.head.bias)

    def check_input(self, x_t: Tensor, t: Tensor) -> None:
        """Raise ValueError when x_t / t do not fit this network."""
        c, s = self.config.in_channels, self.config.image_size
        if x_t.dim() != 4 or tuple(x_t.shape[1:]) != (c, s, s):
            raise ValueError(
                f"U-Net expects images of shape (B, {c}, {s}, {s}), got {tuple(x_t.shape)}: "
                "check the data's image_size/channels against the model's net config"
            )
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must have shape ({x_t.shape[0]},), got {tuple(t.shape)}")

    @staticmethod
    def _run(layers: nn.ModuleList, h: Tensor, emb: Tensor) -> Tensor:
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def encode(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """Time embedding, stem, down path and bottleneck.

        (B,C,H,W), (B,) -> bottleneck h (B, C_mid, H', W'), the skip activations (outermost
        first) and the time embedding (B, 4*base_channels): the inputs of :meth:`decode`.
        """
        emb = self.time_embed(timestep_embedding(t, self.config.base_channels))
        h = self.stem(x_t)
        skips = [h]
        for layers in self.down:
            h = self._run(layers, h, emb)
            skips.append(h)
        return self._run(self.mid, h, emb), skips, emb

    def decode(self, h: Tensor, skips: list[Tensor], emb: Tensor) -> Tensor:
        """Up path over the skips of :meth:`encode` (not modified), final norm and SiLU -> (B, base_channels, H, W)."""
        skips = list(skips)
        for layers in self.up:
            if isinstance(layers[0], ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(layers, h, emb)
        return nn.functional.silu(self.out_norm(h))

    def features(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Everything but the head: (B,C,H,W), (B,) -> (B, base_channels, H, W) activations."""
        return self.decode(*self.encode(x_t, t))

    def forward(self, x_t: Tensor, t: Tensor, detach_variance_features: bool = False) -> tuple[Tensor, Tensor]:
        """(B,C,H,W), (B,) -> eps mean (B,C,H,W), log-variance (B,C,H,W).

        ``detach_variance_features``: the log-variance is computed from features cut off the
        autograd graph, so a loss on it trains only the head (the trunk stays a plain eps
        predictor; used by the ``hybrid`` objective). Values are unchanged.
        """
        h = self.features(x_t, t)
        eps, log_var = self.head(h).chunk(2, dim=1)
        if detach_variance_features:
            log_var = self.head(h.detach()).chunk(2, dim=1)[1]
        return eps, log_var
