"""Epsilon scaling: a training-free correction of the exposure bias (Ning et al., ICLR 2024).

During sampling the network sees its own imperfect x_t, not the forward process's, and its noise
predictions come out too large in norm (the "exposure bias" of Ning et al., "Elucidating the
Exposure Bias in Diffusion Models", Sec. 5). Epsilon scaling divides the prediction by a factor
slightly above one,

    eps' = eps / lambda_t,        lambda_t = scale + slope * t / (T - 1),

so lambda runs from ``scale + slope`` at t = T-1 to ``scale`` at t = 0 (the paper's linear
schedule in t; ``slope = 0`` is its uniform one). The x0 estimate the stepper uses follows:
x0' = (x_t - sqrt(1-a_t) eps') / sqrt(a_t), and the epistemic variance with it (divided by lambda^2).
No extra denoiser calls.

On bdiff's digits model the best constant lambda is above 1 only at 5 NFE, about 1 at 10 and
0.99-0.995 at 20 (docs/nfe_recipes.md, "Epsilon scaling"): there the predictions are too small, not too
large.

Place it first among the callbacks, so blending, step control and the critic read the scaled
prediction. Written here because no library offers it as a hook: diffusers' schedulers take the
model output as given.
"""

from __future__ import annotations

from torch import Tensor

from bdiff.checks import as_number
from bdiff.sampling.sampler import Sampler, SamplerCallback
from bdiff.sampling.state import SamplerState


class EpsilonScaling(SamplerCallback):
    """Divide every noise prediction by lambda_t = ``scale`` + ``slope`` * t / (T-1) (module docstring).

    Args:
        scale: lambda at t = 0 (> 0; 1 with ``slope`` 0 changes nothing).
        slope: how much larger lambda is at t = T-1 than at t = 0 (lambda must stay > 0).
    """

    name = "eps_scaling"

    def __init__(self, scale: float = 1.0, slope: float = 0.0) -> None:
        self.scale = as_number("eps_scaling scale", scale, 0, exclusive=True)
        self.slope = as_number("eps_scaling slope", slope)
        if self.scale + self.slope <= 0:
            raise ValueError(f"eps_scaling: scale + slope (lambda at t = T-1) must be > 0, got {self.scale + self.slope}")

    def factor(self, t: Tensor, timesteps: int) -> Tensor:
        """lambda_t (B,) float64 at integer timesteps t (B,) of a T-step schedule."""
        return self.scale + self.slope * t.double().clamp(min=0) / (timesteps - 1)

    def after_prediction(self, state: SamplerState, sampler: Sampler) -> None:
        schedule = sampler.schedule
        lam = schedule.broadcast(self.factor(state.t, schedule.timesteps), state.x)
        pred = state.prediction
        # eps' = eps / lambda is a fixed function of eps: its weight-posterior variance is Var[eps] / lambda^2.
        sampler.replace_prediction(state, pred.eps / lam, pred.var_epistemic / lam**2, state.active)
