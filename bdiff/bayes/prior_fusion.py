"""How far to trust the network's x0 estimate over the data's Gaussian (Wiener) one, per t, measured on held-out images.

Two estimators of x0 from x_t: the network's, x0_net, and the best linear one, x0_lin, of
:class:`~bdiff.gaussian_denoiser.GaussianDenoiser` fitted to the training images. Their
minimum-variance unbiased combination (the Kalman / Bates-Granger combination of two forecasts
with errors e_net, e_lin) is

    x0 = x0_lin + w (x0_net - x0_lin),    w = (P_lin - C) / (P_lin + P_net - 2 C)
                                            = E[(x0 - x0_lin) . (x0_net - x0_lin)] / E[|x0_net - x0_lin|^2],

with P the error variances and C the errors' covariance. Those moments are what the network's
own variances cannot give: its x0 error about the truth (bias included, which the variance head
absorbs on training images) and how it co-varies with the linear estimator's. So they are measured
where the truth is known, on held-out images, per t (knots, linear between), and w is clipped to
[0, 1]. The combination's held-out error is then never above either estimator's: where the network
beats the Wiener filter by a margin (low and middle noise on a trained model) w is 1 and
sampling is unchanged; at high noise, where an undertrained network's x0 estimate is its eps error
amplified by 1/sqrt(a_t) (up to 160x on the linear schedule), w falls towards 0 and the sampler
follows the data's first two moments there, as Wang & Vastola (2023) do for the first steps.

No library fits this; it is two running sums per knot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bdiff.bayes.error_scale import knot_lerp
from bdiff.bayes.recalibration import default_knots
from bdiff.denoiser import Prediction
from bdiff.gaussian_denoiser import GaussianDenoiser
from bdiff.schedule import NoiseSchedule

PRIOR_WEIGHT_KNOTS = 16  # t_k quadratic in k, as the calibration's
PRIOR_WEIGHT_NOISE_SEED = 40_000  # (t, noise) draws of the fit
PRIOR_WEIGHT_WEIGHT_SEED = 40_001  # weight samples of the fit (sampled predictive), so a refit is reproducible
PRIOR_WEIGHT_IMAGES = 256  # at most this many held-out images (one noise draw each per knot)


@dataclass(frozen=True)
class PriorWeight:
    """w(t) in [0, 1] per knot, linear between knots: ``x0 = x0_lin + w (x0_net - x0_lin)`` (module docstring).

    Attributes:
        knots: increasing integer timesteps (K,).
        weight: w at each knot (K,).
        net_mse: the network's held-out x0 mean squared error per pixel at each knot (K,), for reports.
        prior_mse: the Wiener filter's (K,).
        fused_mse: the combination's (K,).
    """

    knots: tuple[int, ...]
    weight: tuple[float, ...]
    net_mse: tuple[float, ...] = ()
    prior_mse: tuple[float, ...] = ()
    fused_mse: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.knots) < 2 or len(self.weight) != len(self.knots):
            raise ValueError("PriorWeight needs >= 2 knots and one weight per knot")
        if any(b <= a for a, b in zip(self.knots, self.knots[1:])):
            raise ValueError(f"PriorWeight knots must increase, got {self.knots}")
        if any(not 0.0 <= w <= 1.0 for w in self.weight):
            raise ValueError(f"PriorWeight weights must be in [0, 1], got {self.weight}")

    def __call__(self, t: Tensor) -> Tensor:
        """w(t) for integer t (B,) -> (B,) float32 (the end knots' value beyond them)."""
        return knot_lerp(self.knots, self.weight, t)

    def to_dict(self) -> dict[str, list]:
        """Plain lists, for a checkpoint (loads under ``torch.load(weights_only=True)``)."""
        return {"knots": list(self.knots), "weight": list(self.weight), "net_mse": list(self.net_mse),
                "prior_mse": list(self.prior_mse), "fused_mse": list(self.fused_mse)}

    @classmethod
    def from_dict(cls, d: dict[str, list]) -> PriorWeight:
        weight, net, prior, fused = (tuple(float(v) for v in d.get(key, ()))
                                     for key in ("weight", "net_mse", "prior_mse", "fused_mse"))
        return cls(tuple(int(k) for k in d["knots"]), weight, net, prior, fused)


def fit_prior_weight(
    predict: Callable[[Tensor, Tensor], Prediction],
    schedule: NoiseSchedule,
    prior: GaussianDenoiser,
    val_x0: Tensor,
    knots: list[int],
    generator: torch.Generator,
    batch_size: int = 256,
) -> PriorWeight:
    """w(t) at ``knots`` from held-out images ``val_x0`` (N,C,H,W) in [-1, 1], one noise draw per image and knot.

    ``predict(x_t, t)`` is the network as it samples; ``prior`` the Wiener filter of its training images.
    """
    if len(val_x0) < 2:
        raise ValueError(f"fit_prior_weight needs >= 2 held-out images, got {len(val_x0)}")
    weight, net_mse, prior_mse, fused_mse = [], [], [], []
    for t_int in knots:
        cross = spread = err_net = err_lin = 0.0
        for x0 in val_x0.split(batch_size):
            t = torch.full((len(x0),), t_int, dtype=torch.long, device=x0.device)
            x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=generator).to(x0))
            with torch.no_grad():
                x0_net = schedule.eps_to_x0(x_t, t, predict(x_t, t).eps).double()
            x0_lin = prior.posterior(x_t, t)[0].double()
            diff, miss = x0_net - x0_lin, x0.double() - x0_lin
            cross, spread = cross + float((miss * diff).sum()), spread + float((diff**2).sum())
            err_net += float(((x0.double() - x0_net) ** 2).sum())
            err_lin += float((miss**2).sum())
        w = min(1.0, max(0.0, cross / spread)) if spread > 0 else 1.0
        pixels = val_x0.numel()
        # |x0 - x0_lin - w diff|^2 summed = err_lin - 2 w cross + w^2 spread
        weight.append(w)
        net_mse.append(err_net / pixels)
        prior_mse.append(err_lin / pixels)
        fused_mse.append((err_lin - 2 * w * cross + w * w * spread) / pixels)
    return PriorWeight(tuple(int(k) for k in knots), tuple(weight), tuple(net_mse), tuple(prior_mse), tuple(fused_mse))


def prior_images(train: Any, val: Any, max_train: int) -> tuple[Tensor, Tensor]:
    """(the first ``max_train`` training images (N_tr,C,H,W), the first PRIOR_WEIGHT_IMAGES held-out ones (N_val,C,H,W))
    of two datasets, for :func:`fit_denoiser_prior`; an empty split gives a (0,) tensor."""
    def first(dataset: Any, n: int) -> Tensor:
        n = min(len(dataset), n)
        return torch.stack([dataset[i] for i in range(n)]) if n else torch.empty(0)

    return first(train, max_train), first(val, PRIOR_WEIGHT_IMAGES)


def fit_denoiser_prior(denoiser, train_x0: Tensor, val_x0: Tensor) -> tuple[GaussianDenoiser, PriorWeight]:
    """The Wiener filter of training images ``train_x0`` (N_tr,C,H,W) and ``denoiser``'s w(t) on held-out ``val_x0``
    (N_val,C,H,W, at most PRIOR_WEIGHT_IMAGES used), at the PRIOR_WEIGHT_KNOTS knots with the fit's fixed seeds.

    ``denoiser`` is a :class:`~bdiff.bayes.predictive.BayesianDenoiser` (its ``seeded`` fixes the weight samples).
    Training and ``python -m bdiff.recalibrate`` both fit through here.
    """
    # The filter as a checkpoint stores it (at most STORED_RANK directions), so w(t) describes the pair sampling reads.
    fitted = GaussianDenoiser.fit(train_x0.cpu(), denoiser.schedule)
    prior = GaussianDenoiser.from_dict(fitted.to_dict(), denoiser.schedule).to(val_x0.device)
    knots = default_knots(denoiser.schedule.timesteps, PRIOR_WEIGHT_KNOTS)
    with denoiser.seeded(PRIOR_WEIGHT_WEIGHT_SEED):
        weight = fit_prior_weight(denoiser.predict, denoiser.schedule, prior, val_x0[:PRIOR_WEIGHT_IMAGES], knots,
                                  torch.Generator().manual_seed(PRIOR_WEIGHT_NOISE_SEED))
    return prior, weight
