"""Reverse-process steppers in one linear form, so one sampler loop serves them all.

Every stepper moves x_t to x_s (s < t; s = -1 means the final image, a_s = 1) as

    x_s = a * x_t + b * D + noise_std * z,      D = w_cur * x0_hat(t) + w_prev * x0_hat(t_prev)

with per-sample coefficients. Writing them this way lets the sampler propagate
variance generically (:mod:`bdiff.sampling.propagation`) and lets tests compare
each stepper with diffusers' ``step`` on identical inputs.

* DDPM ancestral (Ho et al. 2020, eq. 7; posterior q(x_s | x_t, x0) for any s < t).
* DDIM (Song et al. 2021, eq. 12), with ``eta``.
* DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2), data prediction,
  second-order multistep with a first-order first step and (optionally) last step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """``steps`` descending timesteps with "trailing" spacing, starting at T-1 (Lin et al. 2024, Table 2).

    Same grid as diffusers' ``timestep_spacing="trailing"``; the last step goes to x_0 (a_prev = 1).
    """
    if steps < 1 or steps > num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    grid = torch.arange(num_train_timesteps, 0, -num_train_timesteps / steps, dtype=torch.float64)
    return (grid.round().long() - 1).tolist()


def alpha_bar_at(alphas_cumprod: Tensor, t: Tensor) -> Tensor:
    """a_t for integer t (B,), with a_{-1} = 1 (the clean image). float64 (B,)."""
    ac = alphas_cumprod.to(device=t.device, dtype=torch.float64)
    return torch.where(t >= 0, ac[t.clamp(min=0)], torch.ones_like(ac[:1]))


@dataclass
class StepCoefficients:
    """Per-sample coefficients of one step, each (B,) float64 (see module docstring)."""

    a: Tensor
    b: Tensor
    w_cur: Tensor
    w_prev: Tensor
    noise_std: Tensor


class Stepper:
    """Base class: ``coefficients(a_t, a_s, a_prev)`` gives a step's linear form (all (B,) float64).

    ``a_prev`` is a_{t_prev} of the previous step's start (B,), NaN where none
    (first step of a sample); single-step methods ignore it.
    """

    name: str = "base"
    uses_history: bool = False

    def coefficients(self, a_t: Tensor, a_s: Tensor, a_prev: Tensor) -> StepCoefficients:
        raise NotImplementedError


class DDPM(Stepper):
    """Ancestral sampling from the posterior q(x_s | x_t, x0_hat) with the "fixed_small" variance."""

    name = "ddpm"

    def coefficients(self, a_t: Tensor, a_s: Tensor, a_prev: Tensor) -> StepCoefficients:
        alpha = a_t / a_s
        beta = 1 - alpha
        b = a_s.sqrt() * beta / (1 - a_t)
        a = alpha.sqrt() * (1 - a_s) / (1 - a_t)
        var = ((1 - a_s) / (1 - a_t) * beta).clamp(min=1e-20)
        zero = torch.zeros_like(a)
        return StepCoefficients(a, b, torch.ones_like(a), zero, torch.where(a_s < 1, var.sqrt(), zero))


class DDIM(Stepper):
    """DDIM with stochasticity ``eta`` (eta=0 deterministic, eta=1 equals DDPM's posterior)."""

    name = "ddim"

    def __init__(self, eta: float = 0.0) -> None:
        if eta < 0:
            raise ValueError(f"DDIM eta must be >= 0, got {eta}")
        self.eta = eta

    def coefficients(self, a_t: Tensor, a_s: Tensor, a_prev: Tensor) -> StepCoefficients:
        sigma = self.eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).clamp(min=0).sqrt()
        dir_coef = (1 - a_s - sigma**2).clamp(min=0).sqrt()  # coefficient of eps_hat
        a = dir_coef / (1 - a_t).sqrt()
        b = a_s.sqrt() - a * a_t.sqrt()
        return StepCoefficients(a, b, torch.ones_like(a), torch.zeros_like(a), sigma)


class DPMSolverPP2M(Stepper):
    """DPM-Solver++(2M): x_s = (sig_s/sig_t) x_t + alpha_s (1 - e^{-h}) D, D = (1 + 1/2r) x0_t - (1/2r) x0_prev.

    h = lambda_s - lambda_t, lambda = log(alpha/sigma); r = h_prev / h. First order on a
    sample's first step and on the final step to sigma = 0 (h is infinite there), as
    diffusers does with ``final_sigmas_type="zero"``.
    """

    name = "dpmpp_2m"
    uses_history = True

    @staticmethod
    def _sigma_over_alpha(a: Tensor) -> Tensor:
        return ((1 - a) / a).sqrt()  # e^{-lambda}

    def coefficients(self, a_t: Tensor, a_s: Tensor, a_prev: Tensor) -> StepCoefficients:
        rho_t, rho_s = self._sigma_over_alpha(a_t), self._sigma_over_alpha(a_s)
        a = ((1 - a_s) / (1 - a_t)).sqrt()  # sigma_s / sigma_t
        exp_neg_h = rho_s / rho_t  # e^{-h}; 0 at the final step (sigma_s = 0)
        b = a_s.sqrt() * (1 - exp_neg_h)
        h = torch.log(rho_t) - torch.log(rho_s)
        h_prev = torch.log(self._sigma_over_alpha(a_prev)) - torch.log(rho_t)
        second = torch.isfinite(h_prev) & torch.isfinite(h)
        half_over_r = torch.where(second, 0.5 * h / h_prev, torch.zeros_like(h))
        half_over_r = torch.nan_to_num(half_over_r, nan=0.0, posinf=0.0, neginf=0.0)
        zero = torch.zeros_like(a)
        return StepCoefficients(a, b, 1 + half_over_r, -half_over_r, zero)


STEPPERS: dict[str, type[Stepper]] = {"ddpm": DDPM, "ddim": DDIM, "dpmpp_2m": DPMSolverPP2M}


def make_stepper(name: str, **kwargs: object) -> Stepper:
    """A stepper by name (``ddpm``, ``ddim``, ``dpmpp_2m``) with its keyword options."""
    if name not in STEPPERS:
        raise ValueError(f"unknown stepper {name!r}; choose one of {sorted(STEPPERS)}")
    return STEPPERS[name](**kwargs)
