"""The posterior designs ``benchmarks/heldout_class.py`` compares with the shipped ones (``benchmarks/heldout_baselines/``).

The closed-form head posterior against autograd and Monte Carlo; the randomized-prior head ensemble and the
decoder branches keep the trained model's mean, and their members learn.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bdiff.checkpoint import load_model
from bdiff.datasets import digits_split
from tests.conftest import benchmark_module

laplace = benchmark_module("heldout_baselines.laplace")
HeadEnsemble = benchmark_module("heldout_baselines.head_ensemble").HeadEnsemble
DecoderEnsemble = benchmark_module("heldout_baselines.decoder_ensemble").DecoderEnsemble


@pytest.fixture(scope="module")
def denoiser(last_ckpt: Path):
    return load_model(last_ckpt)


def test_patches_are_the_jacobian_of_the_head_conv() -> None:
    """eps_c(p) = w_c . phi(p): phi is d eps / d (weight, bias), checked with torch.func.jacrev."""
    h = torch.randn(2, 5, 4, 4)
    w, b = torch.randn(1, 5, 3, 3), torch.randn(1)
    jac_w, jac_b = torch.func.jacrev(lambda w, b: F.conv2d(h, w, b, padding=1), argnums=(0, 1))(w, b)
    phi = laplace.head_patches(h)  # (B, D, P)
    expected = torch.cat([jac_w.reshape(2, 16, -1), jac_b.reshape(2, 16, 1)], dim=2)  # (B, P, D)
    torch.testing.assert_close(phi.transpose(1, 2), expected)


def test_laplace_variance_matches_monte_carlo_over_head_weights(denoiser) -> None:
    x0 = digits_split("val")[:64] * 2 - 1
    fisher, n = laplace.head_fisher(denoiser.model, denoiser.schedule, [x0], draws=1)
    lap = laplace.HeadLaplace(denoiser.model, denoiser.schedule, fisher, n, laplace.default_prior_precision(denoiser.model))
    x_t, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([20, 200, 600])
    with torch.no_grad():
        pred = lap.predict(x_t, t)
        h = denoiser.model.net.features(x_t, t)
    mean = torch.cat([lap.weights["head.weight"][:1].flatten(), lap.weights["head.bias"][:1]])
    draws = mean + (lap.cov_chol[0] @ torch.randn(mean.numel(), 20_000, generator=torch.Generator().manual_seed(0))).T
    eps = torch.einsum("kd,bdp->kbp", draws, laplace.head_patches(h))
    standard_error = (eps.var(0) / eps.shape[0]).sqrt().reshape(pred.eps.shape)  # of the Monte Carlo mean
    assert ((eps.mean(0).reshape(pred.eps.shape) - pred.eps).abs() <= 5 * standard_error + 1e-6).all()
    torch.testing.assert_close(eps.var(0).reshape(pred.eps.shape), pred.var_epistemic, rtol=0.05, atol=1e-7)
    with pytest.raises(ValueError, match="at least one batch"):
        laplace.head_fisher(denoiser.model, denoiser.schedule, [])


def test_head_ensemble_keeps_the_models_mean_and_its_members_learn(denoiser) -> None:
    ens = HeadEnsemble(denoiser.model, denoiser.schedule, members=4, hidden=8, prior_scale=1.0)
    x_t, t = torch.randn(3, 1, 8, 8), torch.tensor([20, 200, 600])
    with torch.no_grad():
        pred, base = ens.predict(x_t, t), denoiser.predict_uncalibrated(x_t, t)
    torch.testing.assert_close(pred.eps, base.eps)
    assert (pred.var_epistemic > 0).all()
    losses = ens.fit((digits_split("train")[:256] * 2 - 1).split(64), steps=60)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    assert not any(p.requires_grad for p in ens.priors.parameters())


def test_decoder_members_are_the_trained_encoder_under_their_own_decoders(denoiser) -> None:
    ens = DecoderEnsemble(denoiser.model, denoiser.schedule, members=2, seed=5)
    x_t, t = torch.randn(4, 1, 8, 8), torch.tensor([10, 100, 400, 900])
    with torch.no_grad():
        got = ens.members_eps(*denoiser.model.net.encode(x_t, t))
    for m in range(2):
        net = copy.deepcopy(denoiser.model.net)
        with torch.no_grad():
            for name, p in zip(ens.names, ens.stacked, strict=True):
                net.get_parameter(name).copy_(p[m])
            torch.testing.assert_close(got[m], net(x_t, t)[0], rtol=1e-4, atol=1e-5)
    before = {n: p.detach().clone() for n, p in denoiser.model.named_parameters()}
    losses = ens.fit((digits_split("train")[:256] * 2 - 1).split(64), steps=40)
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    for n, p in denoiser.model.named_parameters():
        torch.testing.assert_close(p, before[n], msg=f"{n} changed")
    torch.testing.assert_close(ens.predict(x_t, t).eps, denoiser.predict_uncalibrated(x_t, t).eps)
