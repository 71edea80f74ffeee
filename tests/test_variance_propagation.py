"""Propagated variance vs the empirical variance of many full chains with sampled weights.

Gaussian data x0 ~ N(0, s^2 I) has an exact MMSE denoiser, so Tweedie's identity
(the Jacobian term of the propagation) holds exactly, and a Bayesian perturbation
eps_w = eps* + w g(t) with one scalar weight w ~ N(0, tau^2) per chain acts
coherently at every step. The linearised propagation is then exact, and the
Monte Carlo variance over chains must match it up to sampling error.
"""

from __future__ import annotations

import pytest
import torch

from bdiff.denoiser import Prediction
from bdiff.sampling import DDIM, DDPM, DPMSolverPP2M, Sampler, UniPC
from bdiff.sampling.noise import NoiseSource
from bdiff.schedule import NoiseSchedule

S2, TAU = 0.25, 0.05


def g(t: torch.Tensor) -> torch.Tensor:
    return (0.3 + t.float() / 1000).reshape(-1, 1, 1, 1)


class GaussianDenoiser:
    """Exact eps-MMSE denoiser for N(0, S2) data, plus w * g(t) for a per-row weight w."""

    image_shape = (1, 2, 2)

    def __init__(self, w: torch.Tensor | None = None) -> None:
        self.schedule = NoiseSchedule("linear")
        self.w = w

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> Prediction:
        a = self.schedule.alpha_bar(t, x)
        denom = a * S2 + (1 - a)
        eps = (1 - a).sqrt() / denom * x
        var_al = (a * S2 / denom).expand_as(x)
        if self.w is not None:  # one chain per row, fixed weights
            return Prediction(eps + self.w.reshape(-1, 1, 1, 1) * g(t), torch.zeros_like(x), var_al)
        return Prediction(eps, (TAU * g(t)) ** 2 * torch.ones_like(x), var_al)


@pytest.mark.parametrize("stepper", [DDIM(), DPMSolverPP2M(), UniPC(), DDIM(eta=1.0), DDPM()], ids=lambda s: f"{s.name}")
@pytest.mark.parametrize("steps", [5, 20])
def test_propagated_variance_matches_monte_carlo_chains(stepper, steps: int) -> None:
    chains = 4000
    x_T = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    # Propagated: one run with the posterior-mean denoiser.
    state = Sampler(GaussianDenoiser(), stepper, steps).run(x_T.clone(), NoiseSource(7, [0]))
    # Monte Carlo: many chains from the same x_T and the same ancestral noise, each with its own weight.
    w = TAU * torch.randn(chains, generator=torch.Generator().manual_seed(1))
    noise = NoiseSource(7, [0] * chains)  # identical seeds: every chain sees the same ancestral noise
    mc = Sampler(GaussianDenoiser(w), stepper, steps).run(x_T.expand(chains, -1, -1, -1).clone(), noise).x
    empirical = mc.var(0, keepdim=True)
    torch.testing.assert_close(state.var, empirical, rtol=0.1, atol=1e-8)
    assert state.var.min() > 0
