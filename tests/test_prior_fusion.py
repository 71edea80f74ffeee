"""The Wiener-filter fallback: w(t) fitted on held-out images (bdiff.bayes.prior_fusion) and the PriorFusion callback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bdiff.bayes.prior_fusion import PriorWeight, fit_prior_weight
from bdiff.checkpoint import load_model, read_checkpoint
from bdiff.denoiser import Prediction
from bdiff.gaussian_denoiser import GaussianDenoiser
from bdiff.recalibrate import main as recalibrate
from bdiff.sampler_callbacks import PriorFusion
from bdiff.sampling import DDIM, Sampler, UniPC
from bdiff.sampling.noise import NoiseSource
from bdiff.schedule import NoiseSchedule

SHAPE = (1, 4, 4)


CENTRES, SPREAD = (-0.5, 0.5), 0.1


def two_blob_images(n: int, seed: int = 0) -> torch.Tensor:
    """Non-Gaussian data, two clusters c 1 + 0.1 N(0, I), c = +-0.5: the best denoiser is not the linear one. (n,1,4,4)."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.where(torch.rand(n, 1, generator=g) < 0.5, CENTRES[0], CENTRES[1])
    return (centre + SPREAD * torch.randn(n, 16, generator=g)).view(n, *SHAPE)


class NoisyNetwork:
    """A 'network': the exact E[x0 | x_t] of the two clusters plus an error growing with t, c (t/T)^2 sin(7 x_t) in
    eps units (a fixed function of x_t, as a network's error is): better than the Wiener filter at low t only."""

    def __init__(self, schedule: NoiseSchedule, c: float) -> None:
        self.schedule, self.c = schedule, c

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        a = self.schedule.alpha_bar(t, x_t)
        var = a * SPREAD**2 + 1 - a
        logits = torch.stack([-((x_t - a.sqrt() * c) ** 2).flatten(1).sum(1) / (2 * var.flatten()) for c in CENTRES], 1)
        resp = logits.softmax(1)
        x0 = sum(resp[:, k].view(-1, 1, 1, 1) * (c + a.sqrt() * SPREAD**2 / var * (x_t - a.sqrt() * c))
                 for k, c in enumerate(CENTRES))
        eps = self.schedule.x0_to_eps(x_t, t, x0)
        error = self.c * self.schedule.broadcast(t.float() / 1000, x_t) ** 2 * torch.sin(7 * x_t)
        return Prediction(eps + error, torch.zeros_like(eps), torch.zeros_like(eps))


def test_the_fitted_weight_trusts_the_better_estimator_and_the_combination_beats_both() -> None:
    schedule = NoiseSchedule("linear", 1000)
    prior = GaussianDenoiser.fit(two_blob_images(4000), schedule)
    knots = [0, 100, 400, 700, 999]
    weight = fit_prior_weight(NoisyNetwork(schedule, 0.3), schedule, prior, two_blob_images(500, seed=1), knots,
                              torch.Generator().manual_seed(0))
    assert weight.knots == tuple(knots)
    assert min(weight.weight[:2]) > 0.99 and weight.weight[-1] < 0.01  # the error in x0 is e(t) sqrt(1-a)/sqrt(a)
    assert 0.3 < weight.weight[2] < 0.99  # both estimators err at t = 400: the combination takes from each
    fused, net, lin = (np.array(v) for v in (weight.fused_mse, weight.net_mse, weight.prior_mse))
    assert (net[:2] < lin[:2]).all() and net[-1] > 10 * lin[-1]
    assert fused[2] < min(net[2], lin[2])
    assert (fused <= np.minimum(net, lin) * (1 + 1e-9)).all()
    assert PriorWeight.from_dict(weight.to_dict()) == weight


def test_weight_interpolates_between_knots_and_refuses_bad_tables() -> None:
    weight = PriorWeight((0, 100, 999), (1.0, 0.5, 0.0))
    np.testing.assert_allclose(weight(torch.tensor([0, 50, 100, 999, 2000])).numpy(), [1.0, 0.75, 0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        PriorWeight((0, 10), (1.0, 1.5))
    with pytest.raises(ValueError, match="increase"):
        PriorWeight((10, 0), (1.0, 1.0))


class WithPrior:
    """A Denoiser (a mislabelled Wiener filter standing in for a network) carrying a fitted fallback."""

    def __init__(self, net: NoisyNetwork, prior: GaussianDenoiser, weight: PriorWeight) -> None:
        self.schedule, self.image_shape, self.net = prior.schedule, SHAPE, net
        self.prior, self.prior_weight = prior, weight

    def predict(self, x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        return self.net(x_t, t)


@pytest.mark.parametrize("stepper", [DDIM(), UniPC()], ids=["ddim", "unipc"])
def test_fusion_is_the_base_sampler_where_w_is_1_and_the_wiener_filter_where_w_is_0(stepper) -> None:
    schedule = NoiseSchedule("linear", 1000)
    prior = GaussianDenoiser.fit(two_blob_images(2000), schedule)
    net = NoisyNetwork(schedule, 0.5)
    x_T, noise = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(2)), NoiseSource(3, range(6))

    def run(denoiser, callbacks) -> torch.Tensor:
        return Sampler(denoiser, stepper, 8, callbacks).run(x_T, noise).x

    trusted = WithPrior(net, prior, PriorWeight((0, 999), (1.0, 1.0)))
    assert torch.equal(run(trusted, [PriorFusion()]), run(trusted, []))
    ignored = WithPrior(net, prior, PriorWeight((0, 999), (0.0, 0.0)))
    torch.testing.assert_close(run(ignored, [PriorFusion()]), run(prior, []), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(run(ignored, []), run(prior, []), atol=1e-3)


def test_fusion_refuses_a_denoiser_without_a_fitted_prior() -> None:
    prior = GaussianDenoiser.fit(two_blob_images(100), NoiseSchedule("linear", 1000))
    with pytest.raises(ValueError, match="python -m bdiff.recalibrate --ckpt"):
        Sampler(prior, DDIM(), 4, [PriorFusion()])


def test_training_stores_the_fallback_and_recalibrate_adds_it_to_an_old_checkpoint(last_ckpt: Path,
                                                                                  tmp_path: Path) -> None:
    ckpt = read_checkpoint(last_ckpt)
    assert {"gaussian_prior", "prior_weight"} <= set(ckpt)
    denoiser = load_model(last_ckpt)
    assert denoiser.prior is not None and denoiser.prior.image_shape == (1, 8, 8)
    stored = denoiser.prior_weight
    old = tmp_path / "old.ckpt"
    del ckpt["gaussian_prior"], ckpt["prior_weight"]
    torch.save(ckpt, old)
    assert load_model(old).prior is None
    recalibrate(["--ckpt", str(old)])
    refit = load_model(old)
    assert refit.prior_weight is not None and refit.prior_weight.knots == stored.knots
    np.testing.assert_allclose(refit.prior_weight.weight, stored.weight, atol=1e-4)  # the same fit as training's
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(refit.prior.predict(x, torch.tensor([10, 900])).eps,
                               denoiser.prior.predict(x, torch.tensor([10, 900])).eps, atol=1e-4, rtol=1e-4)
