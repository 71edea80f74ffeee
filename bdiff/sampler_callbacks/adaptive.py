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
    """Split the base grid's step where the x0 estimate's error is large, under a budget of extra calls.

    A step t -> s moves x by b(t, s) times the x0 estimate (:func:`ddim_x0_coefficient`), so an error e of
    that estimate about E[x0 | x_t] lands in x_s as b(t, s) e. Its per-pixel variance is the denoiser's
    stated error of the mean (:func:`x0_error_variance`: the epistemic variance times r(t), fitted on held-out
    images; :mod:`bdiff.bayes.error_scale`). The controller keeps the base grid's step t -> t_base when

        |b(t, t_base)| RMS(e) <= tol sqrt(1 - a_s + sigma_floor^2)

    (the error is small beside the noise still left to absorb it); otherwise it steps to the farthest s in
    (t_base, t) of a fine grid that satisfies it (or the next fine point), one extra call, after which the
    base grid resumes. Error-control step sizing as in adaptive ODE solvers (Hairer et al. 1993, II.4),
    with the network's stated error in place of an embedded-pair estimate.

    Units and do-no-harm: it reads only the error of the mean, never Var[x0 | x_t] (the posterior's own
    spread, which no step removes) nor the novelty-scale epistemic variance. Where the model states no error
    (r(t) = 0, or a denoiser without ``epistemic_error``) every step is the base grid's, bit for bit. It only
    ever adds steps: larger steps than the base grid's are a coarser base grid, not this callback.

    Args:
        tol: error tolerance relative to the remaining noise level (> 0).
        max_extra_nfe: at most this many calls per sample beyond the base sampler's (>= 0).
        fine_steps: resolution of the candidate grid for the split steps.
        sigma_floor: noise level below which errors no longer matter (about the data's quantisation
            step), so the last steps to the clean image are kept.
    """

    name = "adaptive"

    def __init__(self, tol: float = 0.5, max_extra_nfe: int = 5, fine_steps: int = 200,
                 sigma_floor: float = 0.02) -> None:
        self.tol = as_number("adaptive tol", tol, 0, exclusive=True)
        self.sigma_floor = as_number("adaptive sigma_floor", sigma_floor, 0)
        self.max_extra_nfe = as_integer("adaptive max_extra_nfe", max_extra_nfe, 0)
        self.fine_steps = as_integer("adaptive fine_steps", fine_steps, 2)

    def on_start(self, state: SamplerState, sampler: Sampler) -> AdaptiveOutput:
        return AdaptiveOutput(torch.zeros_like(state.nfe))

    def after_prediction(self, state: SamplerState, sampler: Sampler) -> None:
        rms = x0_error_variance(state, sampler).clamp(min=0).flatten(1).mean(1).sqrt()  # (B,)
        if not bool((rms[state.active] > 0).any()):
            return  # no stated error: the base grid's step, untouched
        out: AdaptiveOutput = state.outputs[self]
        schedule = sampler.schedule
        t, t_base = state.t, state.t_next
        fine = torch.linspace(schedule.timesteps - 1, 0, self.fine_steps, device=t.device).round().long()
        cand = torch.cat([t_base[:, None], fine[None, :].expand(len(t), -1)], 1)  # (B, 1+M); column 0: the base step
        a_t = schedule.alpha_bar(t)[:, None]
        a_s = schedule.alpha_bar(cand)  # (B, 1+M), a_{-1} = 1
        induced = ddim_x0_coefficient(a_t, a_s).abs() * rms[:, None]
        ok = induced <= self.tol * ((1 - a_s) + self.sigma_floor**2).sqrt()
        between = (cand < t[:, None]) & (cand > t_base[:, None])
        admissible = ok & between  # the farthest admissible split (smallest s), else the first fine point below t
        farthest = torch.where(admissible, cand, torch.full_like(cand, schedule.timesteps)).amin(1)
        nearest = torch.where(between, cand, torch.full_like(cand, -2)).amax(1)
        split = torch.where(admissible.any(1), farthest, nearest)
        wants = state.active & ~ok[:, 0] & between.any(1) & (out.splits < self.max_extra_nfe)
        out.splits += wants.long()
        state.t_next = torch.where(wants, split, t_base)
