"""Clipping the x0 estimate to the data range, as diffusers' ``clip_sample`` and ``thresholding`` do.

Every step's x0 estimate x0_hat = (x_t - sqrt(1-a_t) eps_hat) / sqrt(a_t) can leave [-1, 1], the
range the data lives in; steppers then extrapolate from values no image has. Clipping it,

    x0' = clamp(x0_hat, -limit, limit),      eps' = (x_t - sqrt(a_t) x0') / sqrt(1 - a_t),

is DDIM's ``clip_sample`` (Song et al. 2021; diffusers' ``DDIMScheduler`` with
``use_clipped_model_output=True``: by default it keeps the unclipped eps in the direction term) and, with
``sample_max_value = 1``, the multistep schedulers' ``thresholding`` (Saharia et al. 2022's dynamic
thresholding, whose per-sample percentile s is then clamped to 1, so it clips at 1). A clipped pixel
no longer moves with the weights, so its epistemic variance is set to 0 (the clamp's derivative
there). No extra denoiser calls.

Written here because diffusers' schedulers clip inside their ``step``, not as a hook a sampler
callback can reuse. Place it after callbacks that change the prediction (epsilon scaling) and
before those that read it (blending, step control, the critic).
"""

from __future__ import annotations

import torch

from bdiff.checks import as_number
from bdiff.sampling.sampler import Sampler, SamplerCallback
from bdiff.sampling.state import SamplerState


class ClipX0(SamplerCallback):
    """Clamp every x0 estimate to [-``limit``, ``limit``] and take the noise prediction that gives it (module
    docstring).

    Args:
        limit: the data's largest absolute value (> 0; 1 for images scaled to [-1, 1]).
    """

    name = "clip_x0"

    def __init__(self, limit: float = 1.0) -> None:
        self.limit = as_number("clip_x0 limit", limit, 0, exclusive=True)

    def after_prediction(self, state: SamplerState, sampler: Sampler) -> None:
        active = sampler.schedule.broadcast(state.active, state.x)  # finished samples (t = -1) have no eps to clip
        clipped = state.x0.clamp(-self.limit, self.limit)
        moved = (clipped != state.x0) & active
        if not bool(moved.any()):
            return
        eps = torch.where(active, sampler.schedule.x0_to_eps(state.x, state.t, clipped), state.prediction.eps)
        var = torch.where(moved, torch.zeros_like(state.prediction.var_epistemic), state.prediction.var_epistemic)
        sampler.replace_prediction(state, eps, var, state.active)
