"""Variance-weighted blending of the x0 estimate with its history (a per-pixel Kalman filter)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from bdiff.checks import as_number
from bdiff.sampling.sampler import Sampler, SamplerCallback
from bdiff.sampling.state import SamplerState
from bdiff.sampler_callbacks.variance import x0_error_variance, x0_posterior_variance
from bdiff.schedule import NoiseSchedule

_bcast = NoiseSchedule.broadcast


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
