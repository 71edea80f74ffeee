"""Steppers and the sampler loop against diffusers' schedulers on identical inputs."""

from __future__ import annotations

import pytest
import torch

from bdiff.denoiser import Prediction
from bdiff.sampling import DDIM, DDPM, DPMSolverPP2M, Sampler
from bdiff.sampling.noise import NoiseSource
from bdiff.sampling.steppers import alpha_bar_at
from bdiff.schedule import NoiseSchedule

SCHED = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


class ToyDenoiser:
    """eps_hat(x, t) = tanh(x) * (0.5 + t/2000): smooth, x- and t-dependent, known everywhere."""

    image_shape = (1, 4, 4)

    def __init__(self) -> None:
        self.schedule = NoiseSchedule("linear")

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * (0.5 + t.float() / 2000).reshape(-1, 1, 1, 1)

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> Prediction:
        return Prediction(self.eps(x, t), torch.zeros_like(x), torch.ones_like(x))


def one_step(stepper, x, t: int, s: int, x0_prev=None, t_prev=None, z=None) -> torch.Tensor:
    """Apply our stepper's linear form once (what Sampler._update computes)."""
    sched = NoiseSchedule("linear")
    tt = torch.full((x.shape[0],), t)
    ac = sched.alphas_cumprod
    a_prev = alpha_bar_at(ac, torch.full_like(tt, t_prev)) if t_prev is not None else torch.full((x.shape[0],), float("nan"), dtype=torch.float64)
    c = stepper.coefficients(alpha_bar_at(ac, tt), alpha_bar_at(ac, torch.full_like(tt, s)), a_prev)
    x0 = sched.eps_to_x0(x, tt, ToyDenoiser().eps(x, tt))
    d = c.w_cur.float()[:, None, None, None] * x0
    if x0_prev is not None:
        d = d + c.w_prev.float()[:, None, None, None] * x0_prev
    out = c.a.float()[:, None, None, None] * x + c.b.float()[:, None, None, None] * d
    if z is not None:
        out = out + c.noise_std.float()[:, None, None, None] * z
    return out


@pytest.mark.parametrize("steps", [10, 50])
def test_ddpm_step_matches_diffusers(steps: int) -> None:
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(**SCHED, clip_sample=False, variance_type="fixed_small", timestep_spacing="trailing")
    ref.set_timesteps(steps)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for t in ref.timesteps.tolist()[:3] + ref.timesteps.tolist()[-2:]:
        s = t - 1000 // steps
        g = torch.Generator().manual_seed(t)
        expected = ref.step(ToyDenoiser().eps(x, torch.full((3,), t)), t, x, generator=g).prev_sample
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
        ours = one_step(DDPM(), x, t, s if s >= 0 else -1, z=z)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(eta: float) -> None:
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(**SCHED, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    ref.set_timesteps(10)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    z = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    for t in ref.timesteps.tolist():
        s = t - 100
        expected = ref.step(ToyDenoiser().eps(x, torch.full((3,), t)), t, x, eta=eta, variance_noise=z).prev_sample
        ours = one_step(DDIM(eta), x, t, s if s >= 0 else -1, z=z)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def _diffusers_loop(ref, den: ToyDenoiser, x: torch.Tensor, **step_kwargs) -> torch.Tensor:
    for t in ref.timesteps:
        x = ref.step(den.eps(x, torch.full((x.shape[0],), int(t))), t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("steps", [2, 5, 10, 20])
def test_sampler_with_dpmpp_2m_matches_diffusers(steps: int) -> None:
    from diffusers import DPMSolverMultistepScheduler

    ref = DPMSolverMultistepScheduler(
        **SCHED, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        lower_order_final=True, final_sigmas_type="zero", timestep_spacing="trailing",
    )
    ref.set_timesteps(steps)
    den = ToyDenoiser()
    noise = NoiseSource(0, range(3))
    x_T = noise.draw((1, 4, 4))
    ours = Sampler(den, DPMSolverPP2M(), steps).run(x_T, noise).x
    torch.testing.assert_close(ours, _diffusers_loop(ref, den, x_T.clone()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps", [1, 4, 10, 25])
def test_sampler_with_ddim_matches_diffusers(steps: int) -> None:
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(**SCHED, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    ref.set_timesteps(steps)
    den = ToyDenoiser()
    noise = NoiseSource(0, range(3))
    x_T = noise.draw((1, 4, 4))
    state = Sampler(den, DDIM(), steps).run(x_T, noise)
    torch.testing.assert_close(state.x, _diffusers_loop(ref, den, x_T.clone(), eta=0.0), rtol=1e-4, atol=1e-4)
    assert state.nfe.tolist() == [steps] * 3


def test_samples_depend_only_on_seed_and_index() -> None:
    den = ToyDenoiser()
    sampler = Sampler(den, DDPM(), 10)
    whole = sampler.sample(6, seed=3).images
    part = sampler.sample(2, seed=3, first_index=4).images
    torch.testing.assert_close(whole[4:], part)
    assert not torch.allclose(sampler.sample(2, seed=4, first_index=4).images, part)


def test_bad_sampler_arguments() -> None:
    with pytest.raises(ValueError, match="steps"):
        Sampler(ToyDenoiser(), DDIM(), 0)
    with pytest.raises(ValueError, match="eta"):
        DDIM(-1.0)
    with pytest.raises(ValueError, match="n must be"):
        Sampler(ToyDenoiser(), DDIM(), 5).sample(0)
