"""Extra work on uncertain pixels only: masked re-noise and re-denoise (RePaint-style)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bdiff.checks import as_integer, as_number
from bdiff.sampling.sampler import Sampler, SamplerCallback
from bdiff.sampling.state import SamplerState
from bdiff.sampler_callbacks.variance import x0_epistemic_variance, x0_posterior_variance
from bdiff.schedule import NoiseSchedule

_bcast = NoiseSchedule.broadcast


@dataclass
class RefineOutput:
    """:class:`UncertainRegionRefinement`'s run: extra ``passes`` per sample (B,) long, re-done ``pixels`` in all."""

    passes: Tensor
    pixels: int = 0


class UncertainRegionRefinement(SamplerCallback):
    """Extra work on uncertain pixels only: masked re-noise and re-denoise (RePaint-style).

    After a step lands at s within ``t_range``, pixels whose posterior std of x0 is in the
    top ``quantile`` of the sample are re-noised to t_up = s + ``jump`` by the forward process
    and denoised back to s with one DDIM step; other pixels keep their value. At most
    ``max_passes`` extra calls per sample, each counted in ``nfe``.

    Units: the pixel mask reads the same total posterior variance of x0 as :class:`AdaptiveStepSize`
    (posterior spread plus novelty-scale epistemic variance), not the mean's error, so it re-noises
    pixels of an accurate model too. No shipped recipe uses it (BENCHMARKS.md, "Uncertainty in the
    sampler: what does not help").
    """

    name = "refine"

    def __init__(self, quantile: float = 0.8, jump: int = 50, t_range: tuple[int, int] = (50, 600), max_passes: int = 3) -> None:
        self.quantile = as_number("refine quantile", quantile, 0, 1, exclusive=True)
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
        rows = todo.nonzero().squeeze(1)
        schedule = sampler.schedule
        std = (x0_posterior_variance(state, sampler) + x0_epistemic_variance(state, sampler))[rows].sqrt()
        thresh = torch.quantile(std.flatten(1), self.quantile, dim=1)
        mask = std > _bcast(thresh, std)
        t_up = (s[rows] + self.jump).clamp(max=schedule.timesteps - 1)
        x_s = state.x_next[rows]
        x_up = schedule.q_sample(x_s, t_up, state.draw(rows), s[rows])  # q(x_up | x_s)
        eps = sampler.denoiser.predict(x_up, t_up).eps
        x_back = schedule.q_sample(schedule.eps_to_x0(x_up, t_up, eps), s[rows], eps)  # DDIM (eta 0) back to s
        sampler.replace_x_next(state, rows, x_back, mask)
        state.nfe[rows] += 1
        out.passes[rows] += 1
        out.pixels += int(mask.sum())
