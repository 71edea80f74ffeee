"""A plain deterministic DDIM loop (Song et al. 2021, eta = 0) that carries a variance map.

This is the training-time preview sampler (sample grids in W&B, the end-of-run
PNG). The full callback-based sampler lives beside it.

Variance propagation (first order, covariance between x_t and eps_hat ignored):
one DDIM step is linear in (x_t, eps_hat),

    x_prev = c_x x_t + c_e eps_hat,   c_x = sqrt(a_prev / a_t),
                                      c_e = sqrt(1 - a_prev) - sqrt(a_prev (1 - a_t) / a_t)

so Var[x_prev] ~= c_x^2 Var[x_t] + c_e^2 Var_q[eps_hat], with the epistemic
variance of the noise prediction as the source term (as in BayesDiff, Kou et
al. 2024). The final map is Var[x_0] per pixel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bdiff.denoiser import Denoiser


def ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """``steps`` descending timesteps with "trailing" spacing, starting at T-1 (Lin et al. 2024, Table 2).

    Same grid as diffusers' ``timestep_spacing="trailing"``; the last step goes to x_0 (a_prev = 1).
    """
    if steps < 1 or steps > num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    grid = torch.arange(num_train_timesteps, 0, -num_train_timesteps / steps, dtype=torch.float64)
    return (grid.round().long() - 1).tolist()


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    shape: tuple[int, int, int, int],
    steps: int = 50,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    clip: bool = True,
) -> tuple[Tensor, Tensor]:
    """Sample ``shape`` = (B,C,H,W) images in [-1, 1] with ``steps`` DDIM steps.

    Returns:
        x0: (B,C,H,W) samples, clamped to [-1, 1] when ``clip``.
        var: (B,C,H,W) propagated epistemic variance of x0 (same [-1, 1] scale).
    """
    schedule = denoiser.schedule
    x = torch.randn(shape, generator=generator, device="cpu").to(device)
    var = torch.zeros_like(x)
    times = ddim_timesteps(schedule.timesteps, steps)
    abar = schedule.alphas_cumprod.cpu()
    for i, t in enumerate(times):
        t_batch = torch.full((shape[0],), t, device=x.device, dtype=torch.long)
        pred = denoiser.predict(x, t_batch)
        a_t = abar[t]
        a_prev = abar[times[i + 1]] if i + 1 < len(times) else torch.tensor(1.0, dtype=torch.float64)
        c_x = float((a_prev / a_t).sqrt())
        c_e = float((1 - a_prev).sqrt() - (a_prev * (1 - a_t) / a_t).sqrt())
        x = c_x * x + c_e * pred.eps
        var = c_x**2 * var + c_e**2 * pred.var_epistemic
    return (x.clamp(-1, 1) if clip else x), var
