"""Plain ``nn.Module`` networks: (x_t, t) -> (eps_mean, log_var)."""

from bdiff.nets.unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig"]
