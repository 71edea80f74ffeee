"""Discrete variance-preserving (VP) noise schedule and the forward process.

Conventions (DESIGN.md): ``T`` discrete steps, integer timesteps ``t`` in
``[0, T-1]`` index ``alphas_cumprod`` (the diffusers convention), coefficients
kept in float64, images in ``[-1, 1]``.

    q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I),   a_t = alphas_cumprod[t]

t = -1 stands for the clean image at the end of the reverse process: ``a_{-1} = 1``
(:meth:`NoiseSchedule.alpha_bar`). The reverse process's timestep grids (trailing, Karras)
are at the end of this file.

References: Ho et al. 2020 (DDPM, linear betas); Nichol & Dhariwal 2021
(improved DDPM, cosine schedule); Karras et al. 2022 (EDM noise levels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from bdiff.checks import as_integer

ScheduleKind = Literal["linear", "cosine"]


@dataclass
class ScheduleConfig:
    """Arguments of :class:`NoiseSchedule` (the ``model.schedule`` block of a config)."""

    kind: ScheduleKind = "linear"
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Linear betas of Ho et al. 2020, shape (T,), float64."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule of Nichol & Dhariwal 2021 (eq. 17), shape (T,), float64."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - f[1:] / f[:-1]
    return betas.clamp(max=max_beta)


class NoiseSchedule(nn.Module):
    """A discrete VP schedule and the maths of its forward process.

    An ``nn.Module`` only so that ``alphas_cumprod`` (a float64 buffer) follows
    ``.to(device)`` and is saved in checkpoints; it has no parameters.

    Example:
        >>> s = NoiseSchedule("linear", timesteps=1000)
        >>> x0 = torch.zeros(2, 1, 8, 8)
        >>> t = torch.tensor([0, 999])
        >>> x_t = s.q_sample(x0, t, torch.randn_like(x0))
    """

    alphas_cumprod: Tensor

    def __init__(
        self,
        kind: ScheduleKind = "linear",
        timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ) -> None:
        super().__init__()
        if not isinstance(timesteps, int) or timesteps < 2:
            raise ValueError(f"schedule.timesteps must be an integer >= 2, got {timesteps!r}")
        if kind == "linear":
            if not 0 < beta_start < beta_end < 1:
                raise ValueError(
                    f"linear schedule needs 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}"
                )
            betas = linear_betas(timesteps, beta_start, beta_end)
        elif kind == "cosine":
            betas = cosine_betas(timesteps)
        else:
            raise ValueError(f"schedule.kind must be 'linear' or 'cosine', got {kind!r}")
        self.kind = kind
        self.timesteps = timesteps
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, dim=0))

    @staticmethod
    def broadcast(v: Tensor, like: Tensor) -> Tensor:
        """Per-sample ``v`` (B,) -> (B,1,...,1) against ``like`` (B,C,H,W); floats take like's dtype, masks stay bool."""
        v = v.to(like.dtype) if v.is_floating_point() else v
        return v.reshape(-1, *([1] * (like.dim() - 1)))

    def alpha_bar(self, t: Tensor, like: Tensor | None = None) -> Tensor:
        """``a_t`` at integer timesteps ``t`` (B,), with ``a_{-1} = 1``.

        t = -1 stands for the clean image past the last reverse step (x_{-1} = x_0), so every
        formula here holds there too (``q_sample`` is the identity, ``x0_variance`` is 0).
        Without ``like``: float64 (B,). With ``like`` (B,C,H,W): :meth:`broadcast` to it.
        """
        ac = self.alphas_cumprod.to(device=t.device, dtype=torch.float64)
        t = t.long()
        a = torch.where(t >= 0, ac[t.clamp(min=0)], torch.ones((), dtype=ac.dtype, device=ac.device))
        return a if like is None else self.broadcast(a, like)

    def q_sample(self, x: Tensor, t: Tensor, noise: Tensor, s: Tensor | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_s) = N(sqrt(a_t/a_s) x_s, (1 - a_t/a_s) I); x_s = ``x`` (B,C,H,W), t, s (B,).

        ``s`` defaults to -1, the clean image (a_{-1} = 1): the forward process q(x_t | x_0) of
        Ho et al. 2020, eq. 4, ``sqrt(a_t) x0 + sqrt(1-a_t) noise``.
        """
        a = self.alpha_bar(t, x) if s is None else self.broadcast(self.alpha_bar(t) / self.alpha_bar(s), x)
        return a.sqrt() * x + (1 - a).sqrt() * noise

    def eps_to_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x0 = (x_t - sqrt(1-a) eps) / sqrt(a). All (B,C,H,W); t (B,)."""
        a = self.alpha_bar(t, x_t)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def x0_to_eps(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """eps = (x_t - sqrt(a) x0) / sqrt(1-a). All (B,C,H,W); t (B,)."""
        a = self.alpha_bar(t, x_t)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    def x0_variance(self, t: Tensor, eps_variance: Tensor) -> Tensor:
        """Var[x0 | x_t] = (1-a)/a * Var[eps], for x_t held fixed. (B,C,H,W); t (B,)."""
        a = self.alpha_bar(t, eps_variance)
        return (1 - a) / a * eps_variance

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, timesteps={self.timesteps}"


# -- timestep grids of the reverse process ------------------------------------------------------
def ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """``steps`` descending timesteps with "trailing" spacing, starting at T-1 (Lin et al. 2024, Table 2).

    Same grid as diffusers' ``timestep_spacing="trailing"``; the last step goes to x_0 (a_prev = 1).
    """
    if steps < 1 or steps > num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    grid = torch.arange(num_train_timesteps, 0, -num_train_timesteps / steps, dtype=torch.float64)
    return (grid.round().long() - 1).tolist()


def karras_timesteps(alphas_cumprod: Tensor, steps: int, rho: float = 7.0) -> list[int]:
    """``steps`` descending timesteps at Karras et al.'s noise levels (2022, eq. 5), from T-1 down to 0.

    sigma_i = (sigma_max^(1/rho) + i/(steps-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho with
    sigma_t = sqrt((1-a_t)/a_t) of the training schedule; each sigma_i is mapped to a timestep by
    linear interpolation in log sigma and rounded. The same grid as diffusers'
    ``use_karras_sigmas=True`` (checked in the tests); larger ``rho`` spends more steps at low
    noise; one step is [T-1]. ValueError if two steps round to the same timestep (too many steps for the schedule).
    """
    as_integer("karras spacing: steps", steps, 1)
    rho = check_rho(rho)
    ac = alphas_cumprod.detach().to("cpu", torch.float64)
    log_sigmas = (0.5 * ((1 - ac) / ac).log()).numpy()  # increasing in t
    s_min, s_max = float(np.exp(log_sigmas[0])), float(np.exp(log_sigmas[-1]))
    ramp = np.linspace(0, 1, steps)
    sigmas = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    t = np.interp(np.log(sigmas), log_sigmas, np.arange(len(ac))).round().astype(int).tolist()
    if len(set(t)) != len(t):
        raise ValueError(
            f"karras spacing with {steps} steps repeats timesteps {t} (the schedule's sigma_max is {s_max:.3g}); "
            "use fewer steps or spacing 'trailing'"
        )
    return t


def multistep_timesteps(num_train_timesteps: int, steps: int, spacing: str) -> list[int]:
    """``steps`` descending timesteps on diffusers' ``leading`` or ``linspace`` grid (multistep solvers).

    The grids of diffusers' DPMSolverMultistepScheduler and UniPCMultistepScheduler
    (``timestep_spacing``; Lin et al. 2024, Table 2): ``steps + 1`` points from 0 to T-1
    (``linspace``: evenly, rounded; ``leading``: multiples of T // (steps + 1)), highest first,
    the last one (0) dropped because the final step goes to x_0. ``leading`` starts *below* T-1
    (e.g. t = 830 for 5 steps): it skips the noisiest part of the chain.
    """
    if steps < 1 or steps > num_train_timesteps - 1:
        raise ValueError(f"steps must be in [1, {num_train_timesteps - 1}], got {steps}")
    if spacing == "linspace":
        grid = np.linspace(0, num_train_timesteps - 1, steps + 1).round()
    elif spacing == "leading":
        grid = np.arange(steps + 1) * (num_train_timesteps // (steps + 1))
    else:
        raise ValueError(f"multistep spacing must be 'leading' or 'linspace', got {spacing!r}")
    return grid.astype(np.int64)[::-1][:-1].tolist()


SPACINGS = ("trailing", "leading", "linspace", "karras")
RHO_RANGE = (0.1, 100.0)  # Karras et al. use 7; outside this the grid degenerates or overflows


def check_rho(rho: object) -> float:
    """``rho`` as a float; ValueError unless it is a real number in :data:`RHO_RANGE`."""
    lo, hi = RHO_RANGE
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not lo <= rho <= hi:
        raise ValueError(f"karras rho must be a number in [{lo:g}, {hi:g}] (Karras et al. use 7), got {rho!r}")
    return float(rho)


def check_timesteps(timesteps: object, steps: int, num_train_timesteps: int) -> list[int]:
    """An explicit grid as a list; ValueError unless it is ``steps`` strictly descending integers in [0, T-1]."""
    values = list(timesteps) if isinstance(timesteps, (list, tuple)) else None
    if (values is None or len(values) != steps or not all(isinstance(t, int) and not isinstance(t, bool) for t in values)
            or not all(0 <= t < num_train_timesteps for t in values) or any(a <= b for a, b in zip(values, values[1:]))):
        raise ValueError(f"timesteps must be {steps} strictly descending integers in [0, {num_train_timesteps - 1}], "
                         f"got {timesteps!r}")
    return values


def grid_timesteps(alphas_cumprod: Tensor, steps: int, spacing: str = "trailing", rho: float = 7.0) -> list[int]:
    """The sampler's descending timestep grid, one of :data:`SPACINGS`: ``trailing`` (:func:`ddim_timesteps`),
    ``leading`` or ``linspace`` (:func:`multistep_timesteps`), ``karras`` (:func:`karras_timesteps`)."""
    if spacing == "trailing":
        return ddim_timesteps(len(alphas_cumprod), steps)
    if spacing in ("leading", "linspace"):
        return multistep_timesteps(len(alphas_cumprod), steps, spacing)
    if spacing == "karras":
        return karras_timesteps(alphas_cumprod, steps, rho)
    raise ValueError(f"spacing must be one of {list(SPACINGS)}, got {spacing!r}")
