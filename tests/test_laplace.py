"""Closed-form head posterior (bdiff.bayes.laplace) against autograd and Monte Carlo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bdiff.bayes.laplace import HeadLaplace, default_prior_precision, head_fisher, head_patches
from bdiff.checkpoint import load_model
from bdiff.evaluate import digits_split


@pytest.fixture(scope="module")
def denoiser(last_ckpt: Path):
    return load_model(last_ckpt)


def test_patches_are_the_jacobian_of_the_head_conv() -> None:
    """eps_c(p) = w_c . phi(p): phi is d eps / d (weight, bias), checked with torch.func.jacrev."""
    h = torch.randn(2, 5, 4, 4)
    w, b = torch.randn(1, 5, 3, 3), torch.randn(1)
    jac_w, jac_b = torch.func.jacrev(lambda w, b: F.conv2d(h, w, b, padding=1), argnums=(0, 1))(w, b)
    phi = head_patches(h)  # (B, D, P)
    expected = torch.cat([jac_w.reshape(2, 16, -1), jac_b.reshape(2, 16, 1)], dim=2)  # (B, P, D)
    torch.testing.assert_close(phi.transpose(1, 2), expected)


def test_epistemic_variance_matches_monte_carlo_over_head_weights(denoiser) -> None:
    x0 = digits_split("val")[:64] * 2 - 1
    fisher, n = head_fisher(denoiser.model, denoiser.schedule, [x0], draws=1)
    lap = HeadLaplace(denoiser.model, denoiser.schedule, fisher, n, default_prior_precision(denoiser.model))
    x_t, t = torch.randn(3, 1, 8, 8), torch.tensor([20, 200, 600])
    with torch.no_grad():
        pred = lap.predict(x_t, t)
        h = denoiser.model.net.features(x_t, t)
    mean_w = lap.weights["head.weight"][:1].flatten()
    mean = torch.cat([mean_w, lap.weights["head.bias"][:1]])
    g = torch.Generator().manual_seed(0)
    k = 20_000
    draws = mean + (lap.cov_chol[0] @ torch.randn(mean.numel(), k, generator=g)).T  # (K, D)
    eps = torch.einsum("kd,bdp->kbp", draws, head_patches(h))
    torch.testing.assert_close(eps.mean(0).reshape(pred.eps.shape), pred.eps, atol=5e-3, rtol=0)
    torch.testing.assert_close(eps.var(0).reshape(pred.eps.shape), pred.var_epistemic, rtol=0.05, atol=1e-7)


def test_directions_without_data_keep_the_prior_variance(denoiser) -> None:
    """BLR: where the training features have no component, the posterior variance is the prior's."""
    d = 9 * denoiser.model.net.config.base_channels + 1
    fisher = torch.zeros(1, d, d)
    fisher[0, :10, :10] = torch.eye(10) * 1e3  # data only along the first 10 directions
    lap = HeadLaplace(denoiser.model, denoiser.schedule, fisher, num_data=100, prior_precision=4.0)
    cov = lap.cov_chol[0].double() @ lap.cov_chol[0].double().T
    assert cov[20, 20].item() == pytest.approx(1 / 4.0, rel=1e-4)
    assert cov[0, 0].item() == pytest.approx(1 / (4.0 + 100 * 1e3), rel=1e-4)


def test_fisher_needs_images(denoiser) -> None:
    with pytest.raises(ValueError, match="at least one batch"):
        head_fisher(denoiser.model, denoiser.schedule, [])


def test_head_ensemble_keeps_the_models_mean_and_its_members_learn(denoiser) -> None:
    from bdiff.bayes.head_ensemble import HeadEnsemble

    ens = HeadEnsemble(denoiser.model, denoiser.schedule, members=4, hidden=8, prior_scale=1.0)
    x_t, t = torch.randn(3, 1, 8, 8), torch.tensor([20, 200, 600])
    with torch.no_grad():
        pred, base = ens.predict(x_t, t), denoiser.predict_uncalibrated(x_t, t)
    torch.testing.assert_close(pred.eps, base.eps)
    assert ens.members_eps(ens.features(x_t, t)).shape == (4, 3, 1, 8, 8)
    assert (pred.var_epistemic > 0).all()
    x0 = digits_split("train")[:256] * 2 - 1
    losses = ens.fit(x0.split(64), steps=60)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    assert not any(p.requires_grad for p in ens.priors.parameters())
    with pytest.raises(ValueError, match=">= 2 members"):
        HeadEnsemble(denoiser.model, denoiser.schedule, members=1)
