"""A trained critic ready for sampling: the network, the schedule it was trained for, and loading.

``Critic.logit_and_grad(x_t, t)`` gives the discriminator logit d(x_t, t) (B,) and its input
gradient (B,C,H,W), the Discriminator Guidance correction of Kim et al. (ICML 2023):
grad log(D / (1 - D)) = grad logit.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bdiff.critic.net import CriticConfig, CriticNet
from bdiff.schedule import NoiseSchedule, ScheduleConfig

PREFIX = "net."


class Critic(nn.Module):
    """A critic network with the noise schedule it was trained on (see module docstring).

    Args:
        net: the trained :class:`CriticNet`.
        schedule: the schedule its x_t were drawn from (must equal the sampler's).
        source: where it came from (a checkpoint path), for error messages.
        logit_offset: added to the network's logit: log k for a critic trained on k generated images
            per real one, whose optimal logit is log p_data / p_model - log k (class imbalance), so the
            logit means the same density ratio, and a ``threshold`` the same, for every k.
    """

    def __init__(self, net: CriticNet, schedule: NoiseSchedule, source: str = "<in memory>",
                 logit_offset: float = 0.0) -> None:
        super().__init__()
        self.net, self.schedule, self.source, self.logit_offset = net, schedule, source, float(logit_offset)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.net.config
        return (c.in_channels, c.image_size, c.image_size)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Logit (B,) of x_t (B,C,H,W) being real at integer t (B,)."""
        return self.net(x_t, t) + self.logit_offset

    def logit_and_grad(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Logit (B,) and its gradient with respect to x_t (B,C,H,W); works inside ``torch.no_grad``."""
        with torch.enable_grad():
            x = x_t.detach().to(next(self.net.parameters()).dtype).requires_grad_(True)
            logit = self(x, t)
            (grad,) = torch.autograd.grad(logit.sum(), x)
        return logit.detach(), grad.to(x_t.dtype)

    def check_compatible(self, image_shape: tuple[int, ...], schedule: NoiseSchedule) -> None:
        """Raise ValueError unless this critic was trained for these images and this schedule."""
        if tuple(image_shape) != self.image_shape:
            raise ValueError(
                f"critic {self.source!r} was trained on images of shape {self.image_shape}, but the diffusion "
                f"model makes {tuple(image_shape)}; train a critic for this model (python -m bdiff.lit.critic_module fit ...)"
            )
        mine, theirs = self.schedule.alphas_cumprod, schedule.alphas_cumprod.to(self.schedule.alphas_cumprod.device)
        if mine.shape != theirs.shape or not torch.allclose(mine, theirs, rtol=1e-6, atol=1e-9):
            raise ValueError(
                f"critic {self.source!r} was trained for another noise schedule ({self.schedule.extra_repr()}, "
                f"{mine.numel()} steps) than the diffusion model's ({schedule.extra_repr()}); "
                "train a critic against this model's checkpoint"
            )


def load_critic(path: str | Path, map_location: str | torch.device = "cpu") -> Critic:
    """Restore a critic from a checkpoint written by :mod:`bdiff.lit.critic_module`, weights only, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"critic checkpoint {str(path)!r} does not exist")
    try:
        ckpt: Any = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # RuntimeError/UnpicklingError/EOFError... for truncated, corrupt or pickled files
        raise ValueError(
            f"cannot read critic checkpoint {str(path)!r}: truncated, corrupt, or carrying pickled objects "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
        ) from e
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if not {"critic", "schedule"} <= set(hp) or "state_dict" not in ckpt:
        raise ValueError(
            f"{str(path)!r} is not a critic checkpoint (its hyper_parameters lack critic/schedule); "
            "a diffusion checkpoint goes to --ckpt, a critic to the sampler recipe's critic callback"
        )
    net = CriticNet(CriticConfig(**hp["critic"]))
    state = {k[len(PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(PREFIX)}
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"critic checkpoint {str(path)!r} does not match its own config: {e}") from e
    schedule = NoiseSchedule(**asdict(ScheduleConfig(**hp["schedule"])))
    offset = math.log(hp.get("fakes_per_real") or 1)  # critics of earlier versions: one fake per real image
    return Critic(net, schedule, str(path), offset).to(map_location).eval().requires_grad_(False)
