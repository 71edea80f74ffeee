"""Per-sample step sizes from the posterior variance, under a budget of denoiser calls."""

from __future__ import annotations

import torch

from bdiff.checks import as_integer, as_number
from bdiff.sampling.sampler import Sampler, SamplerCallback
from bdiff.sampling.state import SamplerState
from bdiff.sampler_callbacks.variance import x0_epistemic_variance, x0_posterior_variance


class AdaptiveStepSize(SamplerCallback):
    """Per-sample step size from the posterior-variance error estimate, under an NFE budget.

    A step t -> s moves x by b(t,s) times the x0 estimate, whose error has per-pixel std
    sqrt(Var[x0|x_t]) (aleatoric head, plus epistemic). The controller takes the largest
    step on a fine grid whose induced error, b(t,s) * RMS(std_x0), stays below
    ``tol`` times the noise level sigma_s that is left to absorb it: small steps where the
    estimated error is large, large ones where the model is confident. At most ``max_nfe``
    denoiser calls per sample: the remaining budget is always enough to reach t = -1.

    Units: the rule reads Var[x0 | x_t] (the aleatoric head: the posterior's own spread, which no
    step can remove) plus the novelty-scale epistemic variance (:func:`x0_epistemic_variance`), not the error of
    the step or of the mean, so it does not reduce to its base grid when the model is accurate. No
    shipped recipe uses it: it made FD worse than its base on the default model (BENCHMARKS.md,
    "Uncertainty in the sampler: what does not help").

    Args:
        tol: error tolerance relative to the remaining noise level (> 0).
        max_nfe: hard budget of denoiser calls per sample (>= 1).
        fine_steps: resolution of the candidate grid.
        sigma_floor: noise level below which errors no longer matter (about the data's
            quantisation step), so the last jump to the clean image is allowed.
    """

    name = "adaptive"

    def __init__(self, tol: float = 0.5, max_nfe: int = 20, fine_steps: int = 200, sigma_floor: float = 0.02) -> None:
        self.tol = as_number("adaptive tol", tol, 0, exclusive=True)
        self.sigma_floor = as_number("adaptive sigma_floor", sigma_floor, 0)
        self.max_nfe = as_integer("adaptive max_nfe (the final step needs one call)", max_nfe, 1)
        self.fine_steps = as_integer("adaptive fine_steps", fine_steps, 2)

    def after_prediction(self, state: SamplerState, sampler: Sampler) -> None:
        schedule = sampler.schedule
        fine = torch.linspace(schedule.timesteps - 1, 0, self.fine_steps, device=state.x.device).round().long()
        cand = torch.cat([fine, fine.new_tensor([-1])])  # (M,)
        std_x0 = (x0_posterior_variance(state, sampler) + x0_epistemic_variance(state, sampler)).clamp(min=0).sqrt()
        rms = std_x0.flatten(1).pow(2).mean(1).sqrt()  # (B,)
        a_t = schedule.alpha_bar(state.t)[:, None]  # (B,1)
        a_s = schedule.alpha_bar(cand)[None, :]  # (1,M)
        b = a_s.sqrt() - (1 - a_s).sqrt() * (a_t / (1 - a_t)).sqrt()  # DDIM's x0 coefficient
        allowed = self.tol * ((1 - a_s) + self.sigma_floor**2).sqrt()
        below = cand[None, :] < state.t[:, None]
        ok = (b.abs() * rms[:, None] <= allowed) & below
        # The largest admissible step (last admissible index); else the next fine-grid point.
        position = torch.arange(cand.numel(), device=ok.device)
        largest = (ok.float() * position).argmax(1)
        t_next = cand[torch.where(ok.any(1), largest, below.float().argmax(1))]
        remaining = self.max_nfe - state.nfe  # calls left after this one
        t_next = torch.where(remaining <= 0, torch.full_like(t_next, -1), t_next)
        state.t_next = torch.where(state.active, t_next, state.t_next)
