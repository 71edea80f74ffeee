"""The training-time DDIM preview sampler: matches diffusers' DDIM and propagates variance."""

from __future__ import annotations

import pytest
import torch

from bdiff.denoiser import Prediction
from bdiff.sampling import ddim_sample, ddim_timesteps
from bdiff.schedule import NoiseSchedule


class LinearDenoiser:
    """eps_hat = c * x_t, with a fixed epistemic variance: a denoiser with known answers."""

    def __init__(self, var: float = 0.0) -> None:
        self.schedule = NoiseSchedule("linear")
        self.var = var

    def predict(self, x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        return Prediction(0.5 * x_t, torch.full_like(x_t, self.var), torch.ones_like(x_t))


# Step counts that divide T: for others diffusers steps to t - T//steps, not to the next grid point.
@pytest.mark.parametrize("steps", [1, 4, 10, 50])
def test_ddim_matches_diffusers_ddim_scheduler(steps: int) -> None:
    from diffusers import DDIMScheduler

    den = LinearDenoiser()
    x_ours, _ = ddim_sample(den, (3, 1, 8, 8), steps, torch.Generator().manual_seed(0), clip=False)
    ref = DDIMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing",
    )
    ref.set_timesteps(steps)
    assert ref.timesteps.tolist() == ddim_timesteps(1000, steps)
    x = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    for t in ref.timesteps:
        x = ref.step(0.5 * x, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(x_ours, x, rtol=1e-4, atol=1e-4)


def test_variance_propagation_matches_monte_carlo() -> None:
    """eps_hat independent of x_t with variance v: the propagated map equals the variance over chains."""
    v, steps, n = 0.01, 8, 20_000

    class Noisy(LinearDenoiser):
        def predict(self, x_t, t):
            eps = 0.3 + v**0.5 * torch.randn_like(x_t)
            return Prediction(eps, torch.full_like(x_t, v), torch.ones_like(x_t))

    torch.manual_seed(0)
    # The same starting noise in every chain (one pixel broadcast): only the eps perturbations vary.
    start = torch.randn(1, 1, 1, 1).expand(n, 1, 1, 1)

    class FixedStart(Noisy):
        first = True

        def predict(self, x_t, t):
            if self.first:
                x_t.copy_(start)
                self.first = False
            return super().predict(x_t, t)

    x0, var = ddim_sample(FixedStart(), (n, 1, 1, 1), steps, clip=False)
    assert var.std() < 1e-6 * var.mean()  # the same map for every chain
    assert x0.var().item() == pytest.approx(var.mean().item(), rel=0.05)
