"""The Wiener-filter denoiser (bdiff.gaussian_denoiser) against Monte Carlo on Gaussian data, and sampled by our steppers."""

from __future__ import annotations

import pytest
import torch

from bdiff.gaussian_denoiser import GaussianDenoiser
from bdiff.sampling import DDIM, Sampler
from bdiff.sampling.noise import NoiseSource
from bdiff.schedule import NoiseSchedule

SHAPE = (1, 3, 3)  # D = 9


def gaussian_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images (n,1,3,3), mean (9,), covariance (9,9)) of a correlated Gaussian with a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(9, 9, generator=g, dtype=torch.float64) * 0.25
    cov = a @ a.T + 0.01 * torch.eye(9, dtype=torch.float64)
    mean = torch.randn(9, generator=g, dtype=torch.float64) * 0.3
    x = mean + torch.randn(n, 9, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    return x.float().view(n, *SHAPE), mean, cov


@pytest.mark.parametrize("t_int", [50, 400, 900])
def test_posterior_matches_monte_carlo(t_int: int) -> None:
    """E[x0|x_t] has the smallest error any estimator can have on Gaussian data, and Var[x0|x_t] is that error."""
    schedule = NoiseSchedule("linear", 1000)
    x, _, _ = gaussian_data(40_000)
    den = GaussianDenoiser.fit(x, schedule)
    t = torch.full((len(x),), t_int)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    x_t = schedule.q_sample(x, t, eps)
    x0, var = den.posterior(x_t, t)
    err = ((x0 - x) ** 2).mean(0)
    assert torch.allclose(err, var.mean(0), rtol=0.05)
    # Var[x0|x_t] does not depend on x_t for Gaussian data; the mean error must beat the prior mean's.
    assert torch.allclose(var[0], var[-1])
    assert float(err.mean()) < float(((x - x.mean(0)) ** 2).mean())
    pred = den.predict(x_t, t)
    assert torch.allclose(((pred.eps - eps) ** 2).mean(0), pred.var_aleatoric.mean(0), rtol=0.05)
    assert float(pred.var_epistemic.abs().max()) == 0.0


def test_low_rank_fit_matches_the_exact_one_on_low_rank_data() -> None:
    """Data on a 3-d subspace plus isotropic noise: a rank-3 fit gives the exact fit's posterior."""
    schedule = NoiseSchedule("linear", 1000)
    g = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(9, 3, generator=g))[0]
    x = (torch.randn(20_000, 3, generator=g) * torch.tensor([0.6, 0.4, 0.3])) @ basis.T
    x = (x + 0.05 * torch.randn(20_000, 9, generator=g)).view(-1, *SHAPE)
    exact, low = GaussianDenoiser.fit(x, schedule), GaussianDenoiser.fit(x, schedule, rank=3)
    assert low.basis.shape == (9, 3) and low.residual == pytest.approx(0.05**2, rel=0.05)
    x_t = schedule.q_sample(x[:64], torch.full((64,), 300), torch.randn(64, *SHAPE, generator=g))
    (m_exact, v_exact), (m_low, v_low) = exact.posterior(x_t, torch.full((64,), 300)), low.posterior(x_t, torch.full((64,), 300))
    assert torch.allclose(m_low, m_exact, atol=0.01) and torch.allclose(v_low, v_exact, rtol=0.05)


def test_ddim_on_the_exact_denoiser_follows_its_linear_recursion() -> None:
    """On Gaussian data DDIM is linear in each principal direction: z_s = c z_t with z = x - sqrt(a) mu and
    c = sqrt(a_s) k + sqrt(1-a_s) (1 - sqrt(a_t) k) / sqrt(1-a_t), k = sqrt(a_t) lambda / (a_t lambda + 1 - a_t).
    The sampled covariance must be U diag(prod c^2) U^T (DDIM's own shrinkage at 20 steps included) and far from the
    data's, so the check sees both the denoiser and the stepper."""
    schedule = NoiseSchedule("linear", 1000)
    x, _, _ = gaussian_data(20_000)
    den = GaussianDenoiser.fit(x, schedule)
    sampler, n = Sampler(den, DDIM(), 20), 4_000
    out = sampler.run(torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(5)), NoiseSource(11, list(range(n))))
    out = out.x.flatten(1).double()
    a = [float(schedule.alphas_cumprod[t]) for t in sampler.grid[:-1]] + [1.0]
    lam, gain = den.eigenvalues, torch.ones_like(den.eigenvalues)
    for a_t, a_s in zip(a, a[1:]):
        k = a_t**0.5 * lam / (a_t * lam + 1 - a_t)
        gain = gain * (a_s**0.5 * k + (1 - a_s) ** 0.5 * (1 - a_t**0.5 * k) / (1 - a_t) ** 0.5)
    expected = den.basis @ torch.diag(gain**2) @ den.basis.T
    assert torch.allclose(out.mean(0), den.mean.flatten() * (1 - gain.mean() * a[0] ** 0.5), atol=0.04)
    assert torch.allclose(torch.cov(out.T), expected, atol=0.04)
    data_cov = den.basis @ torch.diag(lam) @ den.basis.T
    assert float((expected - data_cov).abs().max()) > 0.1  # DDIM at 20 steps under-disperses Gaussian data


def test_bad_input_is_refused() -> None:
    schedule = NoiseSchedule("linear", 1000)
    with pytest.raises(ValueError, match=">= 2 images"):
        GaussianDenoiser.fit(torch.zeros(1, *SHAPE), schedule)
    with pytest.raises(ValueError, match="basis must be"):
        GaussianDenoiser(schedule, torch.zeros(SHAPE), torch.eye(8), torch.ones(8))
