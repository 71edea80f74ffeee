"""The epistemic variance in the units of the mean's error: a per-t scale fitted on held-out images.

The epistemic variance a :class:`~bdiff.bayes.predictive.BayesianDenoiser` predicts (weight
posterior plus bottleneck GP) ranks images by novelty well, but its *scale* is the prior's: on
the default digits model it reads 0.12 at t = 10 on held-out digits, where the network's excess
error is 0.011. A sampler mechanism that treats it as the error of the mean (a Kalman gain's
measurement noise, a step-size rule) then trusts older estimates where it should not.

What the mechanisms need is the expected squared error of the posterior mean about
E[eps | x_t]. On held-out images the squared error is that plus the irreducible Var[eps | x_t];
on training images, the irreducible part plus the (smaller) training error of the mean. So

    excess(t) = E_val[(eps - eps_hat)^2] - E_train[(eps - eps_hat)^2]

estimates the error of the mean on unseen images from the same distribution, with no use of
the variance head (the generalisation gap; it over-states the error where the net memorised
its training images, whose error then falls below Var[eps | x_t]). We keep the epistemic
variance's per-pixel and per-image shape, and rescale it per t to that level:

    r(t) = max(0, excess(t) - z * se(t)) / E_val[var_epistemic(t)],
    var_error = r(t) * var_epistemic,

with se(t) the standard error of the difference (images are the independent units) and z = 2:
a mechanism acts only on error that is measurably there (one-sided ~98%), and where the model is
as accurate on unseen images as on its training images, r(t) = 0 and every mechanism that reads
``var_error`` reduces to its base sampler by construction. Ranking by novelty is unchanged
(a per-t scale keeps the order of images at each t).

No library estimates this; it is two means and their standard errors per knot, linear in t
between knots (constant beyond the end knots).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from bdiff.bayes.recalibration import default_knots
from bdiff.denoiser import Prediction
from bdiff.schedule import NoiseSchedule

Z_MEASURABLE = 2.0  # excess error below z standard errors counts as none (one-sided ~98%)
ERROR_SCALE_KNOTS = 16  # knots of the fit (t_k quadratic in k, as the variance calibration's)
ERROR_SCALE_DRAWS = 1  # noise draws per image and knot (images, not draws, set the standard error)
ERROR_SCALE_NOISE_SEED = 30_000  # (t, noise) draws of the fit
ERROR_SCALE_WEIGHT_SEED = 30_001  # weight samples of the fit (sampled predictive), so a refit is reproducible
ERROR_SCALE_IMAGES = 512  # at most this many held-out images, and twice as many training images up to it


@dataclass(frozen=True)
class EpistemicErrorScale:
    """r(t) >= 0 per knot, linear between knots: ``var_error = r(t) * var_epistemic`` (module docstring).

    Attributes:
        knots: increasing integer timesteps (K,).
        scale: r at each knot (K,), >= 0; 0 means no measurable error of the mean at that t.
        excess: the measured excess squared error of eps_hat at each knot (K,), for reports.
        standard_error: its standard error (K,).
    """

    knots: tuple[int, ...]
    scale: tuple[float, ...]
    excess: tuple[float, ...] = ()
    standard_error: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.knots) < 2 or len(self.scale) != len(self.knots):
            raise ValueError("EpistemicErrorScale needs >= 2 knots and one scale per knot")
        if any(b <= a for a, b in zip(self.knots, self.knots[1:])):
            raise ValueError(f"EpistemicErrorScale knots must increase, got {self.knots}")
        if any(not math.isfinite(s) or s < 0 for s in self.scale):
            raise ValueError(f"EpistemicErrorScale scales must be finite and >= 0, got {self.scale}")

    def __call__(self, t: Tensor) -> Tensor:
        """r(t) for integer t (B,) -> (B,) float32."""
        return knot_lerp(self.knots, self.scale, t)

    def to_dict(self) -> dict[str, list]:
        """Plain lists, for a checkpoint (loads under ``torch.load(weights_only=True)``)."""
        return {"knots": list(self.knots), "scale": list(self.scale), "excess": list(self.excess),
                "standard_error": list(self.standard_error)}

    @classmethod
    def from_dict(cls, d: dict[str, list]) -> EpistemicErrorScale:
        return cls(tuple(int(k) for k in d["knots"]), tuple(float(v) for v in d["scale"]),
                   tuple(float(v) for v in d.get("excess", ())), tuple(float(v) for v in d.get("standard_error", ())))


def knot_lerp(knots: tuple[int, ...], values: tuple[float, ...], t: Tensor) -> Tensor:
    """Values at increasing integer ``knots``, linear between them and constant beyond the end ones, at t (B,) -> (B,)
    float32 (torch has no 1-D interp: the left knot's index, then the usual lerp)."""
    k = torch.tensor(knots, dtype=torch.float32, device=t.device)
    v = torch.tensor(values, dtype=torch.float32, device=t.device)
    tf = t.float().clamp(k[0], k[-1])
    i = (torch.searchsorted(k, tf, right=True) - 1).clamp(0, len(knots) - 2)
    return torch.lerp(v[i], v[i + 1], (tf - k[i]) / (k[i + 1] - k[i]))


def _errors_at(predict: Callable[[Tensor, Tensor], Prediction], schedule: NoiseSchedule, x0: Tensor, t_int: int,
               generator: torch.Generator, draws: int, batch_size: int) -> tuple[Tensor, Tensor]:
    """Per image: mean squared error of eps_hat (N,) and mean epistemic variance (N,), averaged over ``draws``."""
    err, var = torch.zeros(len(x0), dtype=torch.float64), torch.zeros(len(x0), dtype=torch.float64)
    for _ in range(draws):
        for start in range(0, len(x0), batch_size):
            x = x0[start:start + batch_size]
            t = torch.full((len(x),), t_int, dtype=torch.long, device=x.device)
            noise = torch.randn(x.shape, generator=generator).to(x)
            with torch.no_grad():
                pred = predict(schedule.q_sample(x, t, noise), t)
            err[start:start + len(x)] += ((noise - pred.eps) ** 2).flatten(1).mean(1).double().cpu() / draws
            var[start:start + len(x)] += pred.var_epistemic.flatten(1).mean(1).double().cpu() / draws
    return err, var


def error_scale_images(train: Any, val: Any, max_pixels: int | None = None) -> tuple[Tensor, Tensor]:
    """(training images (N_tr,C,H,W), held-out images (N_val,C,H,W)) for :func:`fit_error_scale`, from two datasets.

    Up to ERROR_SCALE_IMAGES held-out images and up to twice as many training ones (at most ERROR_SCALE_IMAGES);
    ``max_pixels`` caps the pixels of each split per knot and draw (large images). ~5 s on 2 CPU cores for the digits.
    """
    per_image = val[0].numel() * ERROR_SCALE_DRAWS
    limit = min(ERROR_SCALE_IMAGES, max(2, max_pixels // per_image) if max_pixels else ERROR_SCALE_IMAGES)
    n_val = min(limit, len(val))
    n_train = min(limit, 2 * n_val, len(train))
    return torch.stack([train[i] for i in range(n_train)]), torch.stack([val[i] for i in range(n_val)])


def fit_error_scale(
    predict: Callable[[Tensor, Tensor], Prediction],
    schedule: NoiseSchedule,
    train_x0: Tensor,
    val_x0: Tensor,
    knots: list[int],
    generator: torch.Generator,
    draws: int = ERROR_SCALE_DRAWS,
    z: float = Z_MEASURABLE,
    batch_size: int = 256,
) -> EpistemicErrorScale:
    """Fit r(t) at ``knots`` from training images ``train_x0`` (N_tr,C,H,W) and held-out ones ``val_x0`` (N_val,C,H,W).

    ``predict(x_t, t)`` is the denoiser as it samples (calibrated: its ``var_epistemic`` is the one
    the scale multiplies). Each needs at least 2 images.
    """
    if len(train_x0) < 2 or len(val_x0) < 2:
        raise ValueError(f"fit_error_scale needs >= 2 training and >= 2 held-out images, got {len(train_x0)} and {len(val_x0)}")
    scale, excess, se = [], [], []
    for t_int in knots:
        err_tr, _ = _errors_at(predict, schedule, train_x0, t_int, generator, draws, batch_size)
        err_val, var_val = _errors_at(predict, schedule, val_x0, t_int, generator, draws, batch_size)
        gap = float(err_val.mean() - err_tr.mean())
        stderr = math.sqrt(float(err_val.var() / len(err_val) + err_tr.var() / len(err_tr)))
        measurable = max(0.0, gap - z * stderr)
        mean_var = float(var_val.mean())
        scale.append(measurable / mean_var if mean_var > 0 else 0.0)
        excess.append(gap)
        se.append(stderr)
    return EpistemicErrorScale(tuple(int(k) for k in knots), tuple(scale), tuple(excess), tuple(se))


class _SeededDenoiser(Protocol):
    """What :func:`fit_denoiser_error_scale` needs of a :class:`~bdiff.bayes.predictive.BayesianDenoiser`."""

    schedule: NoiseSchedule

    def predict(self, x_t: Tensor, t: Tensor) -> Prediction: ...

    def seeded(self, seed: int) -> Any: ...


def fit_denoiser_error_scale(denoiser: _SeededDenoiser, train_x0: Tensor, val_x0: Tensor) -> EpistemicErrorScale:
    """r(t) of ``denoiser`` at the ERROR_SCALE_KNOTS knots with the fit's fixed seeds, from training images
    ``train_x0`` (N_tr,C,H,W) and held-out ones ``val_x0`` (N_val,C,H,W), both on its device.

    Training and ``python -m bdiff.recalibrate`` both fit through here, so a refit on a checkpoint
    reproduces the r(t) its training stored.
    """
    knots = default_knots(denoiser.schedule.timesteps, ERROR_SCALE_KNOTS)
    with denoiser.seeded(ERROR_SCALE_WEIGHT_SEED):
        return fit_error_scale(denoiser.predict, denoiser.schedule, train_x0, val_x0, knots,
                               torch.Generator().manual_seed(ERROR_SCALE_NOISE_SEED))
