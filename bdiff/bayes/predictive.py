"""Posterior predictive of the Bayesian U-Net as a :class:`~bdiff.denoiser.Denoiser`.

Two exact-in-distribution routes, both one batched call (no Python loop over K):

* **sampled**: draw K weight sets from the mean-field guide (vectorised, no
  network involved), then evaluate the plain U-Net on all of them with
  ``torch.func.vmap`` over ``torch.func.functional_call``. When only the head is
  Bayesian the trunk runs once and only the head is vmapped over K.
* **analytic** (head-only): the head is a conv, linear in its weights, so with
  independent Normal weights W ~ N(mu, s^2), b ~ N(mu_b, s_b^2):
      E[head(h)]   = conv(h, mu) + mu_b
      Var[head(h)] = conv(h^2, s^2) + s_b^2
  The eps channels give E_q[eps_hat] and Var_q[eps_hat] exactly; the log-variance
  channels are Normal(m, v) per pixel, so E_q[sigma^2] = exp(m + v/2) (log-normal mean).
  This is the K -> infinity limit of the sampled route at the cost of one extra conv.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from bdiff.bayes.bottleneck_gp import BottleneckGP
from bdiff.bayes.model import BayesianUNet
from bdiff.bayes.error_scale import EpistemicErrorScale
from bdiff.bayes.prior_fusion import PriorWeight
from bdiff.bayes.recalibration import VarianceCalibration
from bdiff.denoiser import Prediction
from bdiff.gaussian_denoiser import GaussianDenoiser
from bdiff.schedule import NoiseSchedule

HEAD_NAMES = {"head.weight", "head.bias"}


def draw_weights(model: BayesianUNet, num_samples: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """K weight sets from the guide: {parameter_name: (K, *shape)}, reparameterised (differentiable)."""
    out = {}
    for name, (loc, scale) in model.posterior_loc_scale().items():
        z = torch.randn((num_samples, *loc.shape), generator=generator, device=loc.device, dtype=loc.dtype)
        out[name] = loc + scale * z
    return out


def _summarise(eps: Tensor, log_var: Tensor) -> Prediction:
    """(K,B,C,H,W) eps and log-variance samples -> Prediction (law of total variance)."""
    k = eps.shape[0]
    var_epistemic = eps.var(0, correction=1) if k > 1 else torch.zeros_like(eps[0])
    return Prediction(eps.mean(0), var_epistemic, log_var.exp().mean(0))


def predict_with_weights(
    model: BayesianUNet, x_t: Tensor, t: Tensor, weights: dict[str, Tensor], features: Tensor | None = None
) -> Prediction:
    """Evaluate the U-Net for K given weight sets {name: (K, *shape)} in one vmapped call.

    ``features``: the trunk's ``net.features(x_t, t)`` when already computed (head-only posteriors).
    """
    net = model.net
    if set(weights) <= HEAD_NAMES:
        h = net.features(x_t, t) if features is None else features
        head_weights = {name.removeprefix("head."): w for name, w in weights.items()}

        def run_head(w: dict[str, Tensor]) -> Tensor:
            return functional_call(net.head, w, (h,), strict=False)

        eps, log_var = vmap(run_head)(head_weights).chunk(2, dim=2)
    else:

        def run_net(w: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            return functional_call(net, w, (x_t, t), strict=False)

        eps, log_var = vmap(run_net, randomness="different")(weights)
    return _summarise(eps, log_var)


def predict_analytic(model: BayesianUNet, x_t: Tensor, t: Tensor, features: Tensor | None = None) -> Prediction:
    """Closed-form predictive when only ``head.weight`` / ``head.bias`` are Bayesian.

    ``features``: the trunk's ``net.features(x_t, t)`` when already computed.
    """
    if not set(model.bayesian_names) <= HEAD_NAMES:
        raise ValueError(
            f"the analytic predictive needs only the head to be Bayesian, not {model.bayesian_names[:3]}...; "
            "use predictive='sampled'"
        )
    net, post = model.net, model.posterior_loc_scale()
    h = net.features(x_t, t) if features is None else features
    w_mu, w_s = post.get("head.weight", (net.head.weight, torch.zeros_like(net.head.weight)))
    b_mu, b_s = post.get("head.bias", (net.head.bias, torch.zeros_like(net.head.bias)))
    pad = net.head.padding
    mean = F.conv2d(h, w_mu, b_mu, padding=pad)
    var = F.conv2d(h**2, w_s**2, b_s**2, padding=pad)
    eps, log_var_mean = mean.chunk(2, dim=1)
    var_eps, var_log_var = var.chunk(2, dim=1)
    return Prediction(eps, var_eps, torch.exp(log_var_mean + 0.5 * var_log_var))


class BayesianDenoiser(nn.Module):
    """A trained Bayesian U-Net plus its schedule, ready for the samplers.

    ``predict(x_t, t)`` returns the posterior predictive :class:`Prediction`, with the
    aleatoric variance (and, where it alone exceeded the error, the epistemic one) rescaled per t
    by ``calibration`` when one was fitted (:mod:`bdiff.bayes.recalibration`;
    ``predict_uncalibrated`` skips it).
    A model with no Bayesian layers gives zero epistemic variance. With ``epistemic_gp`` set
    (:mod:`bdiff.bayes.bottleneck_gp`, fitted during training with ``model.epistemic_gp: true``)
    the epistemic variance also holds the bottleneck GP's, which notices images unlike the
    training data; the head's own is added to it.

    Example:
        >>> den = BayesianDenoiser(bayes_unet, schedule, num_samples=8)
        >>> pred = den.predict(x_t, t)      # pred.eps, pred.var_epistemic, pred.var_aleatoric
    """

    def __init__(
        self,
        model: BayesianUNet,
        schedule: NoiseSchedule,
        num_samples: int | None = None,
        mode: Literal["auto", "sampled", "analytic"] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.schedule = schedule
        self.num_samples = num_samples or model.config.predictive_samples
        self.mode = mode or model.config.predictive
        if self.num_samples < 1:
            raise ValueError(f"num_samples (K) must be >= 1, got {self.num_samples}")
        if self.mode == "analytic" and not set(model.bayesian_names) <= HEAD_NAMES:
            raise ValueError("mode='analytic' needs only the head to be Bayesian; use mode='sampled'")
        self.generator: torch.Generator | None = None
        self.calibration: VarianceCalibration | None = None
        self.epistemic_gp: BottleneckGP | None = None
        self.error_scale: EpistemicErrorScale | None = None
        self.prior: GaussianDenoiser | None = None
        """The Wiener filter of the training images (:mod:`bdiff.gaussian_denoiser`), fitted at a run's last validation."""
        self.prior_weight: PriorWeight | None = None
        """How far to trust the network over ``prior`` per t (:mod:`bdiff.bayes.prior_fusion`)."""

    @contextmanager
    def seeded(self, seed: int) -> Iterator[None]:
        """Within the block, weight samples come from a generator seeded with ``seed`` (not the global RNG)."""
        device = next(self.model.parameters()).device
        previous, self.generator = self.generator, torch.Generator(device).manual_seed(seed)
        try:
            yield
        finally:
            self.generator = previous

    @property
    def is_bayesian(self) -> bool:
        """False when no layer carries a weight posterior and no bottleneck GP is fitted (zero epistemic variance)."""
        return self.model.is_bayesian or self.epistemic_gp is not None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images this denoiser works on."""
        c = self.model.net.config
        return (c.in_channels, c.image_size, c.image_size)

    def predict(self, x_t: Tensor, t: Tensor) -> Prediction:
        """Posterior predictive at x_t (B,C,H,W), integer t (B,), recalibrated if fitted."""
        pred = self.predict_uncalibrated(x_t, t)
        return self.calibration.apply(pred, t) if self.calibration is not None else pred

    def predict_uncalibrated(self, x_t: Tensor, t: Tensor) -> Prediction:
        """Posterior predictive with the variance head's own aleatoric variance."""
        model = self.model
        model.net.check_input(x_t, t)
        analytic = self.mode == "analytic" or (self.mode == "auto" and set(model.bayesian_names) <= HEAD_NAMES)
        gp, h, features = self.epistemic_gp, None, None
        if gp is not None:  # the trunk once: its bottleneck feeds the GP, its features the head
            h, skips, emb = model.net.encode(x_t, t)
            features = model.net.decode(h, skips, emb)
        if not model.is_bayesian:
            eps, log_var = model.net.head(model.net.features(x_t, t) if features is None else features).chunk(2, dim=1)
            pred = Prediction(eps, torch.zeros_like(eps), log_var.exp())
        elif analytic:
            pred = predict_analytic(model, x_t, t, features)
        else:
            pred = predict_with_weights(model, x_t, t, draw_weights(model, self.num_samples, self.generator), features)
        if gp is None:
            return pred
        return pred._replace(var_epistemic=pred.var_epistemic + gp.epistemic(h, t, pred.var_aleatoric))

    def forward(self, x_t: Tensor, t: Tensor) -> Prediction:
        return self.predict(x_t, t)

    def epistemic_error(self, pred: Prediction, t: Tensor) -> Tensor:
        """Expected squared error of ``pred.eps`` about E[eps | x_t], (B,C,H,W): r(t) * var_epistemic.

        The variance sampler mechanisms consume (:mod:`bdiff.bayes.error_scale`); zero for a model
        with no epistemic variance. Raises where a Bayesian model's checkpoint carries no fitted r(t).
        """
        if not self.is_bayesian:
            return torch.zeros_like(pred.var_epistemic)
        if self.error_scale is None:
            raise ValueError(
                "this model has no epistemic error scale r(t) (fitted at a run's last validation: checkpoints saved "
                "earlier, or trained before it existed, lack it): fit one with "
                "`python -m bdiff.recalibrate --ckpt <checkpoint>`, which adds it to the checkpoint"
            )
        shape = (-1, *([1] * (pred.var_epistemic.dim() - 1)))
        return pred.var_epistemic * self.error_scale(t).to(pred.var_epistemic.dtype).reshape(shape)

    def posterior_chains(self, num_chains: int, generator: torch.Generator | None = None) -> PosteriorChains:
        """A Denoiser for ``num_chains`` reverse chains, each with its own fixed weight sample."""
        weights = draw_weights(self.model, num_chains, generator)
        return PosteriorChains(self.model, self.schedule, weights, self.calibration)


class PosteriorChains(nn.Module):
    """K networks drawn from the weight posterior, run side by side as one Denoiser.

    The input batch is K*B images, chain-major: rows [k*B, (k+1)*B) go through the
    network with weight sample k, in one ``vmap`` call. Running the same starting
    noise through all K chains and taking the variance over chains gives the Monte
    Carlo posterior variance of the final image (the quantity BayesDiff's
    uncertainty iteration approximates). Each chain is deterministic given its
    weights, so its epistemic variance is zero.
    """

    def __init__(
        self,
        model: BayesianUNet,
        schedule: NoiseSchedule,
        weights: dict[str, Tensor],
        calibration: VarianceCalibration | None = None,
    ) -> None:
        super().__init__()
        self.model, self.schedule, self.weights, self.calibration = model, schedule, weights, calibration
        self.num_chains = next(iter(weights.values())).shape[0] if weights else 1

    def predict(self, x_t: Tensor, t: Tensor) -> Prediction:
        """x_t (K*B,C,H,W) chain-major, t (K*B,)."""
        k = self.num_chains
        if x_t.shape[0] % k:
            raise ValueError(f"batch {x_t.shape[0]} is not a multiple of the {k} chains")
        net = self.model.net

        def run(w: dict[str, Tensor], x: Tensor, tt: Tensor) -> tuple[Tensor, Tensor]:
            return functional_call(net, w, (x, tt), strict=False)

        xs, ts = x_t.unflatten(0, (k, -1)), t.unflatten(0, (k, -1))
        eps, log_var = vmap(run)(self.weights, xs, ts) if self.weights else net(x_t, t)
        eps, log_var = eps.reshape(x_t.shape), log_var.reshape(x_t.shape)
        pred = Prediction(eps, torch.zeros_like(eps), log_var.exp())
        return self.calibration.apply(pred, t) if self.calibration is not None else pred
