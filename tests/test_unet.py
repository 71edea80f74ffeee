"""U-Net shapes, configuration errors and input checks."""

from __future__ import annotations

import pytest
import torch

from bdiff.nets import UNet, UNetConfig


@pytest.mark.parametrize(
    "cfg",
    [
        UNetConfig(image_size=8, in_channels=1, base_channels=16, channel_mults=(1, 2), attention_resolutions=(4,)),
        UNetConfig(image_size=28, in_channels=1, base_channels=16, channel_mults=(1, 2, 2), attention_resolutions=(7,)),
        UNetConfig(image_size=32, in_channels=3, base_channels=16, channel_mults=(1, 2, 2), attention_resolutions=(16, 8)),
        UNetConfig(image_size=16, in_channels=3, base_channels=8, channel_mults=(1,), attention_resolutions=()),
    ],
)
def test_unet_shapes_and_head_split(cfg: UNetConfig) -> None:
    net = UNet(cfg)
    x = torch.randn(3, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.tensor([0, 500, 999])
    eps, log_var = net(x, t)
    assert eps.shape == x.shape and log_var.shape == x.shape
    h = net.features(x, t)
    assert h.shape == (3, cfg.base_channels * cfg.channel_mults[0], cfg.image_size, cfg.image_size)
    torch.testing.assert_close(torch.cat([eps, log_var], 1), net.head(h))


def test_unet_uses_time() -> None:
    net = UNet(UNetConfig(base_channels=16, num_heads=2))
    torch.nn.init.normal_(net.head.weight, std=0.1)
    x = torch.randn(2, 1, 8, 8)
    a, _ = net(x, torch.tensor([5, 5]))
    b, _ = net(x, torch.tensor([900, 900]))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"image_size": 10, "channel_mults": (1, 2, 2)}, "image_size"),
        ({"attention_resolutions": (3,)}, "attention_resolutions"),
        ({"base_channels": 12}, "base_channels"),
        ({"dropout": 1.5}, "dropout"),
        ({"channel_mults": ()}, "channel_mults"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        UNet(UNetConfig(**kwargs))


def test_wrong_input_shape_is_a_clear_error() -> None:
    net = UNet(UNetConfig(base_channels=16, num_heads=2))
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        net.check_input(torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))
