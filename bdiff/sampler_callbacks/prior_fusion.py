"""Fall back on the data's Wiener filter where the network's x0 estimate is measurably worse than it.

Every step's x0 estimate becomes ``x0_lin + w(t) (x0_net - x0_lin)``, with x0_lin the linear
MMSE estimate of the training data's mean and covariance (:class:`~bdiff.gaussian_denoiser.GaussianDenoiser`)
and w(t) the held-out-fitted combination weight of :mod:`bdiff.bayes.prior_fusion` (both stored in
the checkpoint by training, or added by ``python -m bdiff.recalibrate``). Where the network beats
the Wiener filter on held-out images (w = 1) the step is exactly the base sampler's, by
construction; no extra denoiser calls (two matrix products per step).

Variances: x0 is affine in x0_net with slope w, so the weight-posterior (epistemic) variance of the
estimate is w^2 times the network's; the Jacobian the propagated map reads (the aleatoric variance,
:mod:`bdiff.sampling.loop`) is w times the network's plus (1 - w) times the Wiener filter's, whose
Var[eps | x_t] is exact for Gaussian data. Place it first, before callbacks that read the prediction.
"""

from __future__ import annotations

import torch

from bdiff.denoiser import Denoiser
from bdiff.sampling.sampler import Sampler, SamplerCallback
from bdiff.sampling.state import SamplerState


class PriorFusion(SamplerCallback):
    """Combine each x0 estimate with the Wiener filter's by the fitted weight w(t) (module docstring)."""

    name = "prior_fusion"

    def check(self, denoiser: Denoiser) -> None:
        if getattr(denoiser, "prior", None) is None or getattr(denoiser, "prior_weight", None) is None:
            raise ValueError(
                "prior_fusion needs the checkpoint's Wiener filter and its weight w(t) (fitted at a run's last "
                "validation; older checkpoints lack them): add them with `python -m bdiff.recalibrate --ckpt <checkpoint>`"
            )

    def after_prediction(self, state: SamplerState, sampler: Sampler) -> None:
        rows = state.active
        if not bool(rows.any()):
            return
        schedule, denoiser, pred = sampler.schedule, sampler.denoiser, state.prediction
        t = state.t.clamp(min=0)
        w = schedule.broadcast(denoiser.prior_weight(t).to(state.x.device), state.x)
        if bool((w[rows] >= 1).all()):
            return  # the network is trusted at every active sample's t: the base sampler's step
        prior = denoiser.prior.predict(state.x, t)
        x0_lin = schedule.eps_to_x0(state.x, t, prior.eps)
        x0 = torch.lerp(x0_lin, state.x0, w)
        eps = schedule.x0_to_eps(state.x, t, x0)
        mask = schedule.broadcast(rows, state.x)
        sampler.replace_prediction(state, eps.where(mask, pred.eps), (w**2 * pred.var_epistemic).where(mask, pred.var_epistemic),
                                   rows)
        aleatoric = torch.lerp(prior.var_aleatoric.to(pred.var_aleatoric), pred.var_aleatoric, w)
        state.prediction = state.prediction._replace(var_aleatoric=aleatoric.where(mask, pred.var_aleatoric))
