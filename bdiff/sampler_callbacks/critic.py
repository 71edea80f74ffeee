"""Critic-driven error correction: discriminator guidance plus a bounded re-noise/re-denoise loop.

Two things, in one sampler callback:

1. **Correction** (Discriminator Guidance, Kim et al., ICML 2023, eq. 9). A time-conditioned
   discriminator d(x_t, t) trained on real vs generated x_t has, at its optimum,
   logit(x_t, t) = log p_data_t(x_t) - log p_model_t(x_t); its gradient is the missing part of
   the model's score. With score = -eps / sigma_t the corrected noise prediction is
   eps' = eps - w sigma_t grad logit, so the x0 estimate moves by

       x0' = x0 + w (1 - a_t) / sqrt(a_t) * grad_x logit(x_t, t)        for t in ``t_range``.

2. **Consistency loop**. When a sample is about to finish, the critic scores the clean image
   (logit at ``flag_t``). A sample whose logit is below ``threshold`` is flagged and sent back:
   re-noised by the forward process to ``t_back`` and denoised again along the sampler's grid,
   at most ``retries`` times. ``mode="region"`` re-does only the pixels where the critic's
   gradient magnitude times the propagated posterior std is in the top ``1 - region_quantile``
   of the image; the other pixels are pinned to the previous result by forward-noising it at
   every step (RePaint, Lugmayr et al. 2022). Every extra denoiser call lands in ``nfe``;
   critic evaluations are counted separately (:class:`CriticOutput`).

Recommended order: blend -> adaptive -> refine -> critic -> recorder (the correction then acts on
the blended x0 and the final check sees the refined image). An ``adaptive`` budget covers the
extra passes too: a sample out of budget jumps to the clean image after a restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from bdiff.checks import as_integer, as_number
from bdiff.denoiser import Denoiser
from bdiff.sampling.sampler import Sampler, SamplerCallback
from bdiff.sampling.state import SamplerState
from bdiff.schedule import NoiseSchedule

MAX_RETRIES = 10
_bcast = NoiseSchedule.broadcast


@runtime_checkable
class Critic(Protocol):
    """What the sampler needs of a critic (:class:`bdiff.critic.Critic` is one): ``logit_and_grad(x_t, t)``,
    the logit d(x_t, t) (B,) of x_t (B,C,H,W) being real and its gradient in x_t (B,C,H,W);
    ``check_compatible`` (ValueError unless trained for these images and this schedule); ``to(device)``."""

    def logit_and_grad(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]: ...

    def check_compatible(self, image_shape: tuple[int, ...], schedule: NoiseSchedule) -> None: ...

    def to(self, device: Any) -> Any: ...


@dataclass
class CriticOutput:
    """:class:`CriticCorrection`'s run, per sample (B,): ``retries`` and ``critic_calls`` (long), ``flagged``
    (bool: scored below the threshold at some finish), ``final_logit`` (the last score); in region mode the
    image being repaired, ``keep``, its re-done pixels ``mask`` (B,C,H,W) and the samples ``repairing`` (B,) bool."""

    retries: Tensor
    flagged: Tensor
    critic_calls: Tensor
    final_logit: Tensor
    repairing: Tensor
    keep: Tensor | None = None
    mask: Tensor | None = None

    def summary(self) -> dict[str, float]:
        """Share of samples flagged, mean retries, critic calls per sample and mean final logit."""
        return {"flagged_share": float(self.flagged.float().mean()), "retries_mean": float(self.retries.float().mean()),
                "critic_calls_mean": float(self.critic_calls.float().mean()),
                "final_logit_mean": float(self.final_logit.nanmean())}


class CriticCorrection(SamplerCallback):
    """Discriminator guidance and critic-flagged re-denoising (see module docstring).

    Args:
        critic: a critic checkpoint path (``bdiff-critic fit ...``) or a :class:`Critic`; None: given later
            (``bdiff-sample --critic PATH``, :meth:`use_critic`).
        weight: guidance weight w (0 turns the correction off; the loop still runs).
        t_range: [lo, hi] timesteps where the correction is applied.
        retries: R, the most extra passes per sample (0 turns the loop off).
        threshold: a finished sample with logit below this is flagged (0 = "D < 1/2").
        t_back: the timestep a flagged sample is re-noised to.
        flag_t: the timestep at which the critic scores a finished image.
        mode: ``sample`` (re-do the whole image) or ``region`` (re-do only the flagged pixels).
        region_quantile: in region mode, pixels above this quantile of |grad| * std are re-done.
        max_nfe: a flagged sample goes back only if its denoiser calls so far plus the pass
            (the grid steps from t_back down) stay within this budget (None: no budget).
    """

    name = "critic"

    def __init__(
        self,
        critic: str | Path | Critic | None = None,
        weight: float = 1.0,
        t_range: tuple[int, int] = (0, 999),
        retries: int = 1,
        threshold: float = 0.0,
        t_back: int = 300,
        flag_t: int = 0,
        mode: str = "sample",
        region_quantile: float = 0.7,
        max_nfe: int | None = None,
    ) -> None:
        if len(t_range) != 2 or not 0 <= t_range[0] <= t_range[1]:
            raise ValueError(f"critic t_range must be [lo, hi] with 0 <= lo <= hi, got {list(t_range)}")
        self.retries = as_integer("critic retries (a bounded loop)", retries, 0, MAX_RETRIES)
        if mode not in ("sample", "region"):
            raise ValueError(f"critic mode must be 'sample' or 'region', got {mode!r}")
        self.max_nfe = None if max_nfe is None else as_integer("critic max_nfe (or null)", max_nfe, 1)
        self.use_critic(critic)
        self.weight, self.threshold = as_number("critic weight", weight, 0), as_number("critic threshold", threshold)
        self.t_back, self.flag_t = as_integer("critic t_back", t_back, 1), as_integer("critic flag_t", flag_t, 0)
        self.region_quantile = as_number("critic region_quantile", region_quantile, 0, 1, exclusive=True)
        self.t_range, self.mode = tuple(t_range), mode

    def use_critic(self, critic: str | Path | Critic | None) -> None:
        """Score with ``critic``: a checkpoint path (read on first use) or a :class:`Critic` (None: not yet known)."""
        if critic is not None and not isinstance(critic, (str, Path, Critic)):
            raise ValueError(f"critic must be a checkpoint path or a Critic, got {type(critic).__name__}")
        self._critic_source = critic
        self._critic: Critic | None = None if isinstance(critic, (str, Path)) else critic

    @property
    def critic(self) -> Critic:
        """The critic, loaded from its checkpoint on first use (so a recipe parses without it)."""
        if self._critic_source is None:
            raise ValueError("the critic sampler callback has no critic: pass --critic <critic checkpoint> "
                             "(train one with bdiff-critic fit) or set its init_args.critic in the recipe")
        if self._critic is None:  # a file: bdiff.critic reads it (the network code is imported only then)
            from bdiff.critic import load_critic

            self._critic = load_critic(self._critic_source)  # type: ignore[arg-type]
        return self._critic

    def check(self, denoiser: Denoiser) -> None:
        super().check(denoiser)
        self.critic.check_compatible(tuple(denoiser.image_shape), denoiser.schedule)
        if self.t_back >= denoiser.schedule.timesteps or self.t_range[1] >= denoiser.schedule.timesteps:
            raise ValueError(
                f"critic t_back={self.t_back} and t_range={list(self.t_range)} must lie below the schedule's "
                f"{denoiser.schedule.timesteps} steps"
            )

    def on_start(self, state: SamplerState, sampler: Sampler) -> CriticOutput:
        self.critic.to(state.x.device)
        b, device = state.x.shape[0], state.x.device
        zeros, no = torch.zeros(b, dtype=torch.long, device=device), torch.zeros(b, dtype=torch.bool, device=device)
        return CriticOutput(retries=zeros.clone(), flagged=no.clone(), critic_calls=zeros.clone(),
                            final_logit=torch.full((b,), float("nan"), device=device), repairing=no.clone())

    # -- 1. discriminator guidance ---------------------------------------------------------------
    def after_prediction(self, state: SamplerState, sampler: Sampler) -> None:
        if self.weight == 0:
            return
        lo, hi = self.t_range
        guided = state.active & (state.t >= lo) & (state.t <= hi)
        rows = guided.nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        t = state.t[rows]
        _, grad = self.critic.logit_and_grad(state.x[rows], t)
        a = sampler.schedule.alpha_bar(t, grad)
        x0 = state.x0.clone()
        x0[rows] = x0[rows] + self.weight * (1 - a) / a.sqrt() * grad
        sampler.replace_x0(state, x0, guided)
        state.outputs[self].critic_calls[rows] += 1

    # -- 2. the consistency loop ------------------------------------------------------------------
    def after_update(self, state: SamplerState, sampler: Sampler) -> None:
        mem: CriticOutput = state.outputs[self]
        ending = state.active & (state.t_next < 0)
        if mem.repairing.any():
            self._pin_unflagged_pixels(state, sampler)
        rows = ending.nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        x_final = state.x_next[rows].clamp(-1, 1)
        flag_t = torch.full_like(rows, self.flag_t)
        logit, grad = self.critic.logit_and_grad(x_final, flag_t)
        mem.critic_calls[rows] += 1
        mem.final_logit[rows] = logit.to(mem.final_logit.dtype)
        bad = (logit < self.threshold) & (mem.retries[rows] < self.retries)
        if self.max_nfe is not None:
            bad &= state.nfe[rows] + self.pass_cost(sampler) <= self.max_nfe
        mem.flagged[rows[logit < self.threshold]] = True
        mem.repairing[rows] = False
        if not bad.any():
            return
        back = rows[bad]
        self._restart(state, sampler, back, x_final[bad], grad[bad])

    def pass_cost(self, sampler: Sampler) -> int:
        """Denoiser calls of one extra pass: from t_back down the sampler's grid to the clean image."""
        grid = sampler.grid
        return 1 + int(((grid >= 0) & (grid < self.t_back)).sum())

    def _restart(self, state: SamplerState, sampler: Sampler, rows: Tensor, x_final: Tensor, grad: Tensor) -> None:
        """Send the finished images ``x_final`` of ``rows`` back to t_back (:meth:`Sampler.restart`)."""
        mem: CriticOutput = state.outputs[self]
        sampler.replace_x_next(state, rows, x_final)
        sampler.restart(state, rows, self.t_back)
        state.flags[rows] = True
        mem.retries[rows] += 1
        if self.mode == "region":
            if mem.keep is None:
                mem.keep, mem.mask = torch.zeros_like(state.x), torch.zeros_like(state.x, dtype=torch.bool)
            std = state.amp_next[rows].abs() + 1e-12  # propagated posterior std of the image
            score = grad.abs() / _bcast(grad.abs().flatten(1).mean(1).clamp(min=1e-12), grad)
            score = score * std / _bcast(std.flatten(1).mean(1), std)
            thresh = torch.quantile(score.flatten(1), self.region_quantile, dim=1)
            mem.mask[rows] = score >= _bcast(thresh, score)  # flat score: whole image
            mem.keep[rows] = x_final
            mem.repairing[rows] = True

    def _pin_unflagged_pixels(self, state: SamplerState, sampler: Sampler) -> None:
        """Region mode: pixels outside the mask follow the forward-noised previous result (RePaint)."""
        mem: CriticOutput = state.outputs[self]
        rows = (mem.repairing & state.active).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        known = sampler.schedule.q_sample(mem.keep[rows], state.t_next[rows], state.draw(rows))  # keep itself at t_next = -1
        sampler.replace_x_next(state, rows, known, ~mem.mask[rows])
