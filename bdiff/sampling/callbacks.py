"""Sampler callbacks: what the sampler does with the uncertainty.

Not to be confused with Lightning callbacks (:mod:`bdiff.lit.callbacks`).
Each says in its docstring which variance it reads and in what units: only
:class:`VarianceWeightedBlending` reads the epistemic variance in the units of the mean's error
(:func:`x0_error_variance`), so only it reduces to its base sampler by construction.
Order matters and is the order given to the :class:`~bdiff.sampling.Sampler`;
the recommended order is blending -> adaptive steps -> refinement -> recorder
(blending changes the x0 estimate the step-size rule reads; refinement works on
the proposed x_next; the recorder sees the final values).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bdiff.checks import as_integer, as_number
from bdiff.sampling.sampler import Sampler, SamplerCallback
from bdiff.sampling.state import SamplerState
from bdiff.schedule import NoiseSchedule

_bcast = NoiseSchedule.broadcast


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


@dataclass
class BlendOutput:
    """:class:`VarianceWeightedBlending`'s run: ``gain``, the mean Kalman gain K of every iteration after the
    first; the filter's estimate ``x0``, its error variance ``p``, the last Var[x0|x_t] ``v`` (B,C,H,W) and the
    samples ``seen`` (B,) bool so far."""

    gain: list[float] = field(default_factory=list)
    x0: Tensor | None = None
    p: Tensor | None = None
    v: Tensor | None = None
    seen: Tensor | None = None


class VarianceWeightedBlending(SamplerCallback):
    """Blend the new x0 prediction with the history, each weighted by the precision of its error.

    A per-pixel Kalman filter on the x0 estimate. The posterior mean m_t = E[x0 | x_t] is a
    martingale along the reverse process, so an estimate made at an earlier step t' differs
    from the current target by an increment of variance Var[x0|x_t'] - Var[x0|x_t] (law of
    total variance); that is the forgetting term. The network's prediction x0_t = m_t + e_t has
    error variance R = E[e_t^2] (:func:`x0_error_variance`: the epistemic variance in the units of
    the mean's error, fitted on held-out images). With P the filtered estimate's error variance:

        P^- = P_{t'} + max(0, V_{t'} - V_t),        V_t = Var[x0 | x_t] (aleatoric head)
        K   = P^- / (P^- + R)    (K = 1 where R = 0)
        x0  = x0_filt + K (x0_t - x0_filt),          P_t = (1 - K) P^-

    Where the network's mean is accurate (R = 0: no measurable excess error at t on held-out
    images) K = 1 and the step is exactly the base sampler's; where it errs, history helps in
    proportion. The first step takes the prediction as is (P = R). The epistemic variance the propagated
    map reads is left as it is.

    Args:
        strength: multiplies R, and so the first step's P = R (0 disables blending: K = 1; 1 is the
            filter as derived).
    """

    name = "blend"
    needs_bayes = True

    def __init__(self, strength: float = 1.0) -> None:
        self.strength = as_number("blend strength", strength, 0)

    def on_start(self, state: SamplerState, sampler: Sampler) -> BlendOutput:
        return BlendOutput()

    def on_restart(self, state: SamplerState, rows: Tensor, sampler: Sampler) -> None:
        out: BlendOutput = state.outputs[self]
        if out.seen is not None:  # a sample sent back for another pass starts a fresh filter
            out.seen[rows] = False

    def after_prediction(self, state: SamplerState, sampler: Sampler) -> None:
        out: BlendOutput = state.outputs[self]
        v_now = x0_posterior_variance(state, sampler)
        r = self.strength * x0_error_variance(state, sampler)
        if out.seen is None:
            out.x0, out.p, out.v, out.seen = state.x0.clone(), r.clone(), v_now, state.active.clone()
            return
        seen = _bcast(out.seen & state.active, r)
        p_prior = out.p + (out.v - v_now).clamp(min=0)
        gain = torch.where(seen & (r > 0), p_prior / (p_prior + r).clamp(min=1e-30), torch.ones_like(r))
        rows = state.active
        sampler.replace_x0(state, torch.lerp(out.x0, state.x0, gain), rows)  # exactly state.x0 where gain = 1
        p = torch.where(seen, (1 - gain) * p_prior, r)
        out.x0, out.p, out.v = state.x0.clone(), torch.where(_bcast(rows, p), p, out.p), v_now
        out.seen = out.seen | state.active
        out.gain.append(float(gain[rows].mean()) if rows.any() else 1.0)


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


@dataclass
class RecorderOutput:
    """:class:`Recorder`'s run: one dict per recorded step (step, t and the chosen tensors, on CPU)."""

    records: list[dict] = field(default_factory=list)


class Recorder(SamplerCallback):
    """Keep chosen per-step tensors, every ``every`` steps, at most ``max_records`` (on CPU).

    Records land in the run's :class:`RecorderOutput` as a list of dicts with the step, t and
    the chosen keys among ``x``, ``x0``, ``x0_var``, ``var``, ``eps``, ``var_epistemic``,
    ``var_aleatoric``; rows limited to the first ``max_samples`` samples. Memory is bounded by
    max_records * max_samples * len(keys) images.
    """

    name = "recorder"
    KEYS = ("x", "x0", "x0_var", "var", "eps", "var_epistemic", "var_aleatoric")

    def __init__(self, keys: Sequence[str] = ("x0", "var"), every: int = 1, max_records: int = 100, max_samples: int = 16) -> None:
        bad = sorted(set(keys) - set(self.KEYS))
        if bad:
            raise ValueError(f"recorder keys {bad} unknown; choose from {list(self.KEYS)}")
        if every < 1 or max_records < 1 or max_samples < 1:
            raise ValueError("recorder needs every, max_records and max_samples >= 1")
        self.keys, self.every, self.max_records, self.max_samples = tuple(keys), every, max_records, max_samples

    def on_start(self, state: SamplerState, sampler: Sampler) -> RecorderOutput:
        return RecorderOutput()

    def after_update(self, state: SamplerState, sampler: Sampler) -> None:
        records = state.outputs[self].records
        if state.step % self.every or len(records) >= self.max_records:
            return
        n = self.max_samples
        sources = {
            "x": state.x, "x0": state.x0, "x0_var": x0_epistemic_variance(state, sampler), "var": state.var,
            **{k: getattr(state.prediction, k) for k in ("eps", "var_epistemic", "var_aleatoric")},
        }
        entry = {"step": state.step, "t": state.t[:n].cpu().clone()}
        entry.update({k: sources[k][:n].detach().cpu().clone() for k in self.keys})
        records.append(entry)
