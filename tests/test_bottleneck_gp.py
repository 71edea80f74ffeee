"""Random-feature GP on the bottleneck (bdiff.bayes.bottleneck_gp) against the GP's kernel-space formula."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bdiff.bayes import BayesConfig, BayesianUNet
from bdiff.bayes.bottleneck_gp import BottleneckGP
from bdiff.checkpoint import load_model
from bdiff.evaluate import digits_split
from bdiff.nets import UNet, UNetConfig
from bdiff.schedule import NoiseSchedule


@pytest.fixture(scope="module")
def denoiser(last_ckpt: Path):
    return load_model(last_ckpt)


@pytest.fixture(scope="module")
def fitted(denoiser):
    x0 = digits_split("train")[:96] * 2 - 1
    gp = BottleneckGP(denoiser.model, denoiser.schedule, features=512, noise=0.1).fit(x0.split(32), draws=2)
    return gp, x0


def training_activations(gp: BottleneckGP, x0: torch.Tensor) -> torch.Tensor:
    """The activations ``fit`` saw (same seeded (t, noise) draws)."""
    g = torch.Generator().manual_seed(gp.seed)
    acts = []
    for batch in x0.split(32):
        for _ in range(2):
            t = torch.randint(0, gp.schedule.timesteps, (batch.shape[0],), generator=g)
            acts.append(gp.bottleneck(gp.schedule.q_sample(batch, t, torch.randn(batch.shape, generator=g)), t))
    return torch.cat(acts)


def test_variance_is_the_gp_posterior_variance_of_its_kernel(fitted) -> None:
    """D-space formula (what predict uses) == n-space GP formula k(x,x) - k_x^T (K + noise I)^-1 k_x."""
    gp, x0 = fitted
    train_phi = gp.random_features(training_activations(gp, x0)).double()
    query = gp.bottleneck(torch.randn(5, 1, 8, 8), torch.tensor([5, 50, 200, 500, 900]))
    q = gp.random_features(query).double()
    gram = train_phi @ train_phi.T + gp.noise * torch.eye(len(train_phi), dtype=torch.float64)
    k_x = train_phi @ q.T  # (n, 5)
    want = (q * q).sum(1) - (k_x * torch.linalg.solve(gram, k_x)).sum(0)
    torch.testing.assert_close(gp.gp_variance(query).double(), want, rtol=1e-3, atol=1e-5)


def test_training_activations_are_certain_and_far_ones_are_not(fitted) -> None:
    gp, x0 = fitted
    seen = gp.gp_variance(training_activations(gp, x0))
    far = gp.gp_variance(gp.center + 50 * gp.scale * torch.randn(8, gp.center.numel(), generator=torch.Generator().manual_seed(0)))
    assert seen.mean() < 0.2 < 0.5 < far.mean() < 1.1  # the prior variance k(x, x) is ~1


def test_predict_keeps_the_models_mean_and_spreads_v_over_pixels(denoiser, fitted) -> None:
    gp, _ = fitted
    x_t, t = torch.randn(3, 1, 8, 8), torch.tensor([20, 200, 600])
    pred, base = gp.predict(x_t, t), denoiser.predict_uncalibrated(x_t, t)
    torch.testing.assert_close(pred.eps, base.eps)
    v = gp.gp_variance(gp.bottleneck(x_t, t))
    torch.testing.assert_close(pred.var_epistemic.mean(dim=(1, 2, 3)), v)
    assert (pred.var_epistemic > 0).all()


def test_bad_use_is_refused(denoiser) -> None:
    gp = BottleneckGP(denoiser.model, denoiser.schedule)
    with pytest.raises(RuntimeError, match="before fit"):
        gp.predict(torch.randn(1, 1, 8, 8), torch.tensor([3]))
    with pytest.raises(ValueError, match="at least one batch"):
        gp.fit([])
    with pytest.raises(ValueError, match="noise > 0"):
        BottleneckGP(denoiser.model, denoiser.schedule, noise=0.0)
    net = UNet(UNetConfig(base_channels=8, num_heads=2))
    with pytest.raises(ValueError, match="only Bayesian layers are the head"):
        BottleneckGP(BayesianUNet(net, BayesConfig(layers="all")), NoiseSchedule())
