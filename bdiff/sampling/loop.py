"""The product sampling loop: one denoiser call per step, all state local (in the style of EDM's
``edm_sampler``, Karras et al. 2022), with the propagated posterior variance of every image.

Variance propagation ("uncertainty iteration", after BayesDiff, Kou et al. 2024, derived here for the
linear form of every stepper, :mod:`bdiff.sampling.steppers`): a weight-posterior perturbation of x_t,
dx_t, moves the x0 estimate through the network's Jacobian, whose diagonal follows from Tweedie's
second-order identity for an MMSE denoiser, d E[eps|x_t]/dx_t = (I - Cov[eps|x_t]) / sigma_t, with
Cov[eps|x_t] read off the aleatoric head (clamped to [0, 1]). So per pixel

    dx0 = (v_al dx_t) / alpha_t  -  sqrt(Var_q[x0_hat]) xi,        dx_s = a dx_t + b (w_cur dx0 + sum_k w_k dx0_k)

with the same standard-normal xi at every step (the same weights act at every step: perturbations add
coherently), carried as a signed amplitude; the map is its square. Dropping the Jacobian term
(``independent_eps``) overestimates the final variance 100x on the digits model (BENCHMARKS.md,
"Propagated uncertainty map").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from bdiff.denoiser import Denoiser, Prediction
from bdiff.sampling.noise import NoiseSource
from bdiff.sampling.steppers import NoiseSampler, StepContext, Stepper, Tracked
from bdiff.schedule import NoiseSchedule

PROPAGATIONS = ("tweedie", "independent_eps")


def predict(denoiser: Denoiser, x: Tensor, t: Tensor) -> Prediction:
    """The denoiser's Prediction at (x (B,C,H,W), t (B,)), in x's dtype."""
    return Prediction(*(part.to(x.dtype) for part in denoiser.predict(x, t)))


def x0_estimate(schedule: NoiseSchedule, x: Tracked, t: Tensor, pred: Prediction, propagation: str = "tweedie"
                ) -> Tracked:
    """The x0 estimate at (x, t) and its amplitude (module docstring); t (B,), the rest (B,C,H,W)."""
    x0 = schedule.eps_to_x0(x.value, t, pred.eps)
    return Tracked(x0, x0_amplitude(schedule, x.amp, t, pred, propagation))


def x0_amplitude(schedule: NoiseSchedule, amp: Tensor, t: Tensor, pred: Prediction, propagation: str = "tweedie"
                 ) -> Tensor:
    """Signed amplitude of the x0 estimate's perturbation, v_al amp / alpha_t - sqrt(Var_q[x0_hat]). (B,C,H,W)."""
    v_al = pred.var_aleatoric.clamp(0, 1) if propagation == "tweedie" else torch.ones_like(amp)
    x0_var = schedule.x0_variance(t, pred.var_epistemic)
    return v_al * amp / schedule.alpha_bar(t, amp).sqrt() - x0_var.clamp(min=0).sqrt()


def noise_sampler(noise: NoiseSource, like: Tensor, rows: Tensor | None = None) -> NoiseSampler:
    """The steppers' ``noise(need)``: draws (B,C,H,W) from the streams of the rows in ``need`` (and in ``rows``,
    (B,) bool, if given), 0 elsewhere; shaped, typed and placed like ``like``."""

    def draw(need: Tensor) -> Tensor:
        chosen = (need if rows is None else need & rows).nonzero().squeeze(1)
        z = torch.zeros_like(like)
        if chosen.numel():
            z[chosen] = noise.draw(tuple(like.shape[1:]), chosen, like.device).to(like.dtype)
        return z

    return draw


@torch.no_grad()
def sample(denoiser: Denoiser, stepper: Stepper, timesteps: Sequence[int], x_T: Tensor, noise: NoiseSource) -> Tracked:
    """Run ``stepper`` down the descending grid ``timesteps`` from x_T (B,C,H,W), one denoiser call per step.

    Returns the final images and their propagated amplitudes (variance = amp**2), each (B,C,H,W).
    ``noise`` gives each sample its own random stream (stochastic steppers draw from it).
    """
    schedule, device = denoiser.schedule, x_T.device
    grid = [int(t) for t in timesteps] + [-1, -1]
    x, memory = Tracked(x_T, torch.zeros_like(x_T)), stepper.memory(x_T)
    draw = noise_sampler(noise, x_T)
    for t, s, after in zip(grid, grid[1:], grid[2:]):
        t_, s_, after_ = (torch.full((x_T.shape[0],), v, dtype=torch.long, device=device) for v in (t, s, after))
        x0 = x0_estimate(schedule, x, t_, predict(denoiser, x.value, t_))
        x, memory = stepper.step(x, x0, StepContext.between(schedule, t_, s_, after_), memory, draw)
    return x
