"""Epsilon scaling (Ning et al. 2024): the sampler sees eps / lambda_t, and nothing else changes."""

from __future__ import annotations

import pytest
import torch

from bdiff.denoiser import Prediction
from bdiff.sampling import DDIM, Sampler, UniPC
from bdiff.sampler_callbacks.eps_scaling import EpsilonScaling
from bdiff.sampling.recipe import load_recipe
from bdiff.schedule import NoiseSchedule


class Linear:
    """eps_hat = c x / lambda(t), epistemic variance 0.01 / lambda(t)^2, lambda(t) = scale + slope * t / (T-1):
    what eps scaling should turn the network with lambda = 1 into."""

    image_shape = (1, 4, 4)
    is_bayesian = True

    def __init__(self, c: float = 0.5, scale: float = 1.0, slope: float = 0.0) -> None:
        self.schedule = NoiseSchedule("cosine")
        self.c, self.scale, self.slope = c, scale, slope

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> Prediction:
        lam = (self.scale + self.slope * t.to(x.dtype) / (self.schedule.timesteps - 1)).view(-1, 1, 1, 1)
        ones = torch.ones_like(x)
        return Prediction(self.c * x / lam, 0.01 * ones / lam**2, 0.3 * ones)


def test_lambda_one_changes_nothing() -> None:
    plain = Sampler(Linear(), UniPC(), 6).sample(4, seed=0, clip=False)
    scaled = Sampler(Linear(), UniPC(), 6, [EpsilonScaling(1.0)]).sample(4, seed=0, clip=False)
    torch.testing.assert_close(plain.images, scaled.images, rtol=0, atol=0)


@pytest.mark.parametrize(("scale", "slope"), [(1.03, 0.0), (0.98, 0.0), (1.0, 0.05), (1.01, -0.008)])
def test_sampling_with_scaling_equals_sampling_the_scaled_network(scale: float, slope: float) -> None:
    """Every step, every t: the stepper's x0 is that of eps / lambda_t, with lambda at the sample's own t, and the
    propagated uncertainty is that of a network whose epistemic variance is divided by lambda_t^2."""
    with_callback = Sampler(Linear(), UniPC(), 7, [EpsilonScaling(scale, slope)]).sample(5, seed=3, clip=False)
    reference = Sampler(Linear(scale=scale, slope=slope), UniPC(), 7).sample(5, seed=3, clip=False)
    torch.testing.assert_close(with_callback.images, reference.images)
    torch.testing.assert_close(with_callback.variance, reference.variance)
    assert not torch.allclose(with_callback.images, Sampler(Linear(), UniPC(), 7).sample(5, seed=3, clip=False).images)


def test_lambda_runs_from_scale_plus_slope_at_T_minus_1_to_scale_at_0() -> None:
    cb = EpsilonScaling(1.01, 0.02)
    lam = cb.factor(torch.tensor([999, 0, -1]), 1000)
    torch.testing.assert_close(lam, torch.tensor([1.03, 1.01, 1.01], dtype=torch.float64))


def test_a_recipe_names_it_and_keeps_ddim_stochastic_steps_working() -> None:
    sampler = load_recipe({"stepper": "DDIM", "steps": 4,
                           "callbacks": [{"class_path": "EpsilonScaling", "init_args": {"scale": 1.02}}]}).build(
        Linear())
    assert isinstance(sampler.callbacks[0], EpsilonScaling) and sampler.callbacks[0].scale == 1.02
    stochastic = Sampler(Linear(), DDIM(eta=1.0), 4, [EpsilonScaling(1.02)]).sample(3, seed=1)
    assert torch.isfinite(stochastic.images).all()


@pytest.mark.parametrize(("options", "message"), [
    ({"scale": 0.0}, "eps_scaling scale"),
    ({"scale": -1.0}, "eps_scaling scale"),
    ({"scale": 0.5, "slope": -0.6}, "scale \\+ slope"),
])
def test_bad_options_are_refused_with_their_name(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EpsilonScaling(**options)
    with pytest.raises(ValueError, match=message):
        load_recipe({"stepper": "UniPC", "steps": 4, "callbacks": [{"class_path": "EpsilonScaling", "init_args": options}]})
