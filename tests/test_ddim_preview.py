"""The training-time DDIM preview sampler: matches diffusers' DDIM; chain variance is exact."""

from __future__ import annotations

import pytest
import torch

from bdiff.denoiser import Prediction
from bdiff.nets import UNet, UNetConfig
from bdiff.sampling import chain_variance, ddim_sample_and_variance, ddim_timesteps
from bdiff.schedule import NoiseSchedule


class LinearDenoiser:
    """eps_hat = x_t / 2: a denoiser with a known answer."""

    def __init__(self) -> None:
        self.schedule = NoiseSchedule("linear")

    def predict(self, x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        return Prediction(0.5 * x_t, torch.zeros_like(x_t), torch.ones_like(x_t))


# Step counts that divide T: for others diffusers steps to t - T//steps, not to the next grid point.
@pytest.mark.parametrize("steps", [1, 4, 10, 50])
def test_ddim_matches_diffusers_ddim_scheduler(steps: int) -> None:
    from diffusers import DDIMScheduler

    x_T = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    x_ours = ddim_sample_and_variance(LinearDenoiser(), x_T, steps, clip=False)[0]
    ref = DDIMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing",
    )
    ref.set_timesteps(steps)
    assert ref.timesteps.tolist() == ddim_timesteps(1000, steps)
    x = x_T.clone()
    for t in ref.timesteps:
        x = ref.step(0.5 * x, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(x_ours, x, rtol=1e-4, atol=1e-4)


def test_chain_variance_equals_separately_run_chains() -> None:
    """K chains batched through PosteriorChains == K separate DDIM runs, one per weight sample."""
    from torch.func import functional_call

    from bdiff.bayes import BayesConfig, BayesianUNet
    from bdiff.bayes.predictive import BayesianDenoiser

    torch.manual_seed(0)
    net = UNet(UNetConfig(base_channels=8, num_heads=2))
    torch.nn.init.normal_(net.head.weight, std=0.1)
    den = BayesianDenoiser(BayesianUNet(net, BayesConfig(layers="decoder", guide_init_scale=0.02)), NoiseSchedule())
    k, steps = 4, 5
    x_T = torch.randn(3, 1, 8, 8)
    chains = den.posterior_chains(k, torch.Generator().manual_seed(1))
    var = chain_variance(chains, k, x_T, steps)

    class Fixed:
        def __init__(self, w):
            self.schedule, self.w = den.schedule, w

        def predict(self, x, t):
            eps, log_var = functional_call(den.model.net, self.w, (x, t))
            return Prediction(eps, torch.zeros_like(eps), log_var.exp())

    runs = [ddim_sample_and_variance(Fixed({n: w[i] for n, w in chains.weights.items()}), x_T, steps)[0] for i in range(k)]
    torch.testing.assert_close(var, torch.stack(runs).var(0), rtol=1e-4, atol=1e-7)
    assert var.max() > 0


def test_chain_variance_needs_two_chains() -> None:
    with pytest.raises(ValueError, match="num_chains must be an integer >= 2"):
        chain_variance(LinearDenoiser(), 1, torch.zeros(1, 1, 8, 8))
