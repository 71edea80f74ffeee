"""Posterior predictive: one batched call equals the loop over K; closed form equals Monte Carlo."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from bdiff.bayes import BayesConfig, BayesianUNet
from bdiff.bayes.predictive import BayesianDenoiser, draw_weights, predict_analytic, predict_with_weights
from bdiff.denoiser import Denoiser
from bdiff.nets import UNet, UNetConfig
from bdiff.schedule import NoiseSchedule

TINY = UNetConfig(base_channels=8, num_heads=2)


def make(layers: str, scale: float = 0.05) -> BayesianUNet:
    torch.manual_seed(0)
    net = UNet(TINY)
    torch.nn.init.normal_(net.head.weight, std=0.1)
    return BayesianUNet(net, BayesConfig(layers=layers, guide_init_scale=scale)).eval()


def inputs(b: int = 6):
    g = torch.Generator().manual_seed(3)
    return torch.randn(b, 1, 8, 8, generator=g), torch.randint(0, 1000, (b,), generator=g)


@pytest.mark.parametrize("layers", ["head", "decoder", "all"])
def test_batched_predictive_equals_loop_over_k(layers: str) -> None:
    m = make(layers, scale=0.01)
    x, t = inputs()
    k = 5
    weights = draw_weights(m, k, torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = predict_with_weights(m, x, t, weights)
        outs = [functional_call(m.net, {n: w[i] for n, w in weights.items()}, (x, t)) for i in range(k)]
    eps = torch.stack([o[0] for o in outs])
    var_al = torch.stack([o[1].exp() for o in outs]).mean(0)
    torch.testing.assert_close(pred.eps, eps.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred.var_epistemic, eps.var(0), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(pred.var_aleatoric, var_al, rtol=1e-5, atol=1e-6)
    assert pred.var_epistemic.min() >= 0 and pred.var_epistemic.max() > 0


def test_analytic_head_predictive_matches_monte_carlo() -> None:
    m = make("head", scale=0.05)
    x, t = inputs()
    with torch.no_grad():
        exact = predict_analytic(m, x, t)
        mc = predict_with_weights(m, x, t, draw_weights(m, 40_000, torch.Generator().manual_seed(1)))
    for field in exact._fields:
        a, b = getattr(exact, field), getattr(mc, field)
        assert (a - b).abs().max() < 0.03 * a.abs().max() + 1e-4, field


def test_deterministic_model_is_a_denoiser_with_zero_epistemic_variance() -> None:
    den = BayesianDenoiser(make("none"), NoiseSchedule())
    assert isinstance(den, Denoiser)
    x, t = inputs()
    pred = den.predict(x, t)
    assert pred.var_epistemic.abs().max() == 0
    eps, log_var = den.model.net(x, t)
    torch.testing.assert_close(pred.eps, eps)
    torch.testing.assert_close(pred.var_total, log_var.exp())


def test_denoiser_modes_and_bad_k() -> None:
    m = make("decoder")
    with pytest.raises(ValueError, match="analytic"):
        BayesianDenoiser(m, NoiseSchedule(), mode="analytic")
    with pytest.raises(ValueError, match="K"):
        BayesianDenoiser(m, NoiseSchedule(), num_samples=-1)
    den = BayesianDenoiser(m, NoiseSchedule(), num_samples=4)
    x, t = inputs()
    assert den.predict(x, t).eps.shape == x.shape
