"""Noise schedule and forward process, checked against diffusers and Monte Carlo."""

from __future__ import annotations

import pytest
import torch

from bdiff.schedule import NoiseSchedule


@pytest.mark.parametrize(("kind", "diffusers_kind"), [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_alphas_cumprod_match_diffusers(kind: str, diffusers_kind: str) -> None:
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule=diffusers_kind)
    ours = NoiseSchedule(kind, timesteps=1000)
    assert ours.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod.float(), rtol=1e-5, atol=1e-7)


def test_q_sample_matches_diffusers_add_noise() -> None:
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    s = NoiseSchedule("linear")
    x0, noise = torch.randn(5, 1, 8, 8), torch.randn(5, 1, 8, 8)
    t = torch.tensor([0, 10, 250, 600, 999])
    torch.testing.assert_close(s.q_sample(x0, t, noise), ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)


def test_q_sample_moments_monte_carlo() -> None:
    s = NoiseSchedule("cosine")
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 0.7)
    t = torch.full((n,), 400)
    x_t = s.q_sample(x0, t, torch.randn_like(x0))
    a = s.alphas_cumprod[400].item()
    assert abs(x_t.mean().item() - a**0.5 * 0.7) < 5e-3
    assert abs(x_t.var().item() - (1 - a)) < 5e-3


def test_eps_x0_round_trip_and_x0_variance() -> None:
    s = NoiseSchedule("linear")
    x0, eps = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([1, 100, 500, 999])
    x_t = s.q_sample(x0, t, eps)
    torch.testing.assert_close(s.eps_to_x0(x_t, t, eps), x0)
    torch.testing.assert_close(s.x0_to_eps(x_t, t, x0), eps)
    # Var[x0_hat] for a random eps_hat with variance v: Monte Carlo vs (1-a)/a v.
    v = 0.3
    eps_hat = eps[:1] + v**0.5 * torch.randn(20_000, 3, 8, 8, dtype=torch.float64)
    tt = torch.full((20_000,), 500)
    mc = s.eps_to_x0(x_t[2:3].expand_as(eps_hat), tt, eps_hat).var(0).mean()
    a = s.alphas_cumprod[500]
    torch.testing.assert_close(mc, (1 - a) / a * v, rtol=0.03, atol=0)
    torch.testing.assert_close(s.x0_variance(tt[:1], torch.full((1, 1, 1, 1), v, dtype=torch.float64)).squeeze(), (1 - a) / a * v)


@pytest.mark.parametrize("kwargs", [{"kind": "quadratic"}, {"timesteps": 1}, {"beta_start": 0.1, "beta_end": 0.01}])
def test_bad_schedule_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="schedule"):
        NoiseSchedule(**kwargs)
