"""The variances sampler callbacks read, per pixel of the x0 estimate, and in what units."""

from __future__ import annotations

import torch
from torch import Tensor

from bdiff.sampling.sampler import Sampler
from bdiff.sampling.state import SamplerState


def x0_posterior_variance(state: SamplerState, sampler: Sampler) -> Tensor:
    """Var[x0 | x_t] per pixel from the aleatoric head: (1-a)/a * E_q[sigma^2]. (B,C,H,W)."""
    return sampler.schedule.x0_variance(state.t, state.prediction.var_aleatoric)


def x0_epistemic_variance(state: SamplerState, sampler: Sampler) -> Tensor:
    """Var_q[x0_hat] per pixel, the novelty-scale epistemic variance of the x0 estimate. (B,C,H,W)."""
    return sampler.schedule.x0_variance(state.t, state.prediction.var_epistemic)


def x0_error_variance(state: SamplerState, sampler: Sampler) -> Tensor:
    """Expected squared error of the x0 estimate about E[x0 | x_t], per pixel: (1-a)/a times the
    denoiser's ``epistemic_error`` (:mod:`bdiff.bayes.error_scale`). (B,C,H,W).

    Zero for a denoiser that states no error of its mean (a deterministic net, posterior chains):
    every mechanism that reads it then reduces to its base sampler.
    """
    error = getattr(sampler.denoiser, "epistemic_error", None)
    if error is None:
        return torch.zeros_like(state.x)
    return sampler.schedule.x0_variance(state.t, error(state.prediction, state.t))
