"""Smaller steps where the network's x0 estimate errs, within a budget of extra denoiser calls."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bdiff.checks import as_integer, as_number
from bdiff.sampler_callbacks.variance import x0_error_variance
from bdiff.sampling.sampler import Sampler, SamplerCallback
from bdiff.sampling.state import SamplerState


@dataclass
class AdaptiveOutput:
    """:class:`AdaptiveStepSize`'s run: the extra steps it inserted per sample, ``splits`` (B,) long."""

    splits: Tensor


def ddim_x0_coefficient(a_t: Tensor, a_s: Tensor) -> Tensor:
    """b(t, s) = sqrt(a_s) - sqrt(1 - a_s) sqrt(a_t / (1 - a_t)): how much of an error in the x0 estimate at t
    a deterministic (DDIM) step t -> s carries into x_s (Song et al. 2021, Eq. 12 rearranged in x0)."""
    return a_s.sqrt() - (1 - a_s).sqrt() * (a_t / (1 - a_t)).sqrt()


class AdaptiveStepSize(SamplerCallback):
    """Halve the base grid's step where the x0 estimate's error is large, under a budget of extra calls.

    A step t -> s moves x by b(t, s) times the x0 estimate (:func:`ddim_x0_coefficient`), so an error e of
    that estimate about E[x0 | x_t] lands in x_s as b(t, s) e. Its per-pixel variance is the denoiser's
    stated error of the mean (:func:`x0_error_variance`: the epistemic variance times r(t), fitted on held-out
    images; :mod:`bdiff.bayes.error_scale`). The controller keeps the base grid's step t -> t_base when

        |b(t, t_base)| RMS(e) <= tol sqrt(1 - a_{t_base} + sigma_floor^2)

    (the error is small beside the noise still left to absorb it); otherwise it steps to the midpoint
    (t + max(t_base, 0)) // 2, one extra call, and tests the rest of the step again from there with the new
    prediction: step halving with error control, as in adaptive ODE solvers (Hairer et al. 1993, II.4), with
    the network's stated error in place of an embedded-pair estimate. Halving keeps consecutive steps of
    similar length, which multistep solvers (DPM-Solver++, UniPC) need to stay stable.

    Units and do-no-harm: it reads only the error of the mean, never Var[x0 | x_t] (the posterior's own
    spread, which no step removes) nor the novelty-scale epistemic variance. Where the model states no error
    (r(t) = 0, or a denoiser without ``epistemic_error``) every step is the base grid's, bit for bit. It only
    ever adds steps: larger steps than the base grid's are a coarser base grid, not this callback.

    Args:
        tol: error tolerance relative to the remaining noise level (> 0).
        max_extra_nfe: at most this many calls per sample beyond the base sampler's (>= 0).
        sigma_floor: noise level below which errors no longer matter (about the data's quantisation
            step), so the last step to the clean image is not halved for an error below it.
    """

    name = "adaptive"

    def __init__(self, tol: float = 0.5, max_extra_nfe: int = 5, sigma_floor: float = 0.02) -> None:
        self.tol = as_number("adaptive tol", tol, 0, exclusive=True)
        self.sigma_floor = as_number("adaptive sigma_floor", sigma_floor, 0)
        self.max_extra_nfe = as_integer("adaptive max_extra_nfe", max_extra_nfe, 0)

    def on_start(self, state: SamplerState, sampler: Sampler) -> AdaptiveOutput:
        return AdaptiveOutput(torch.zeros_like(state.nfe))

    def after_prediction(self, state: SamplerState, sampler: Sampler) -> None:
        rms = x0_error_variance(state, sampler).clamp(min=0).flatten(1).mean(1).sqrt()  # (B,)
        if not bool((rms[state.active] > 0).any()):
            return  # no stated error: the base grid's step, untouched
        out: AdaptiveOutput = state.outputs[self]
        schedule = sampler.schedule
        t, t_base = state.t, state.t_next
        a_base = schedule.alpha_bar(t_base)  # a_{-1} = 1
        carried = ddim_x0_coefficient(schedule.alpha_bar(t), a_base).abs() * rms
        ok = carried <= self.tol * ((1 - a_base) + self.sigma_floor**2).sqrt()
        midpoint = (t + t_base.clamp(min=0)) // 2
        wants = state.active & ~ok & (midpoint > t_base) & (midpoint < t) & (out.splits < self.max_extra_nfe)
        out.splits += wants.long()
        state.t_next = torch.where(wants, midpoint, t_base)
