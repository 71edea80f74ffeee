"""Extra work where the network's x0 estimate errs: masked re-noise and re-denoise (RePaint-style)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bdiff.checks import as_integer, as_number
from bdiff.sampler_callbacks.adaptive import ddim_x0_coefficient
from bdiff.sampler_callbacks.variance import x0_error_variance
from bdiff.sampling.sampler import Sampler, SamplerCallback
from bdiff.sampling.state import SamplerState


@dataclass
class RefineOutput:
    """:class:`UncertainRegionRefinement`'s run: extra ``passes`` per sample (B,) long, re-done ``pixels`` in all."""

    passes: Tensor
    pixels: int = 0


class UncertainRegionRefinement(SamplerCallback):
    """Re-noise and re-denoise the pixels whose x0 error the step carried beyond tolerance (RePaint-style).

    After a step t -> s (s in ``t_range``), a pixel's error e of the x0 estimate about E[x0 | x_t] lands in
    x_s as b(t, s) e (:func:`~bdiff.sampler_callbacks.adaptive.ddim_x0_coefficient`). Pixels where
    |b(t, s)| sd(e) > ``tol`` sqrt(1 - a_s) -- the error is large beside the noise left at s -- are
    re-noised to t_up = s + ``jump`` by the forward process and denoised back to s with one DDIM step
    from a fresh prediction (Lugmayr et al. 2022, RePaint's resampling); the other pixels keep their
    value. At most ``max_passes`` extra calls per sample, each counted in ``nfe``.

    Units and do-no-harm: sd(e) is the denoiser's stated error of the mean (:func:`x0_error_variance`,
    the epistemic variance times r(t)), not Var[x0 | x_t] (the posterior's own spread) nor the
    novelty-scale epistemic variance. Where the model states no error (r(t) = 0, or no
    ``epistemic_error``) no pixel qualifies and the result is the base sampler's, bit for bit, with no
    extra call.

    Args:
        tol: error tolerance relative to the noise level at s (> 0).
        jump: how far up (in timesteps) the masked pixels are re-noised (>= 1).
        t_range: (lo, hi): only steps landing at s in [lo, hi] are refined.
        max_passes: extra calls per sample at most (>= 0).
    """

    name = "refine"

    def __init__(self, tol: float = 0.5, jump: int = 50, t_range: tuple[int, int] = (50, 600),
                 max_passes: int = 3) -> None:
        self.tol = as_number("refine tol", tol, 0, exclusive=True)
        self.jump, self.max_passes = as_integer("refine jump", jump, 1), as_integer("refine max_passes", max_passes, 0)
        self.t_range = tuple(t_range)

    def on_start(self, state: SamplerState, sampler: Sampler) -> RefineOutput:
        return RefineOutput(torch.zeros_like(state.nfe))

    def after_update(self, state: SamplerState, sampler: Sampler) -> None:
        out: RefineOutput = state.outputs[self]
        s = state.t_next
        lo, hi = self.t_range
        todo = state.active & (s >= lo) & (s <= hi) & (out.passes < self.max_passes)
        if not todo.any():
            return
        schedule = sampler.schedule
        error_sd = x0_error_variance(state, sampler).clamp(min=0).sqrt()
        carried = ddim_x0_coefficient(schedule.alpha_bar(state.t, error_sd), schedule.alpha_bar(s, error_sd)).abs()
        mask = carried * error_sd > self.tol * (1 - schedule.alpha_bar(s, error_sd)).sqrt()
        todo = todo & mask.flatten(1).any(1)
        if not todo.any():
            return
        rows = todo.nonzero().squeeze(1)
        mask = mask[rows]
        t_up = (s[rows] + self.jump).clamp(max=schedule.timesteps - 1)
        x_s = state.x_next[rows]
        x_up = schedule.q_sample(x_s, t_up, state.draw(rows), s[rows])  # q(x_up | x_s)
        eps = sampler.denoiser.predict(x_up, t_up).eps
        x_back = schedule.q_sample(schedule.eps_to_x0(x_up, t_up, eps), s[rows], eps)  # DDIM (eta 0) back to s
        sampler.replace_x_next(state, rows, x_back, mask)
        state.nfe[rows] += 1
        out.passes[rows] += 1
        out.pixels += int(mask.sum())
