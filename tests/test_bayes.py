"""Bayesian layers: selection, priors, guide initialisation, ELBO scaling, module-local params."""

from __future__ import annotations

import copy

import pyro
import pytest
import torch

from bdiff.bayes import (
    BayesConfig,
    BayesianUNet,
    NonFiniteElboError,
    guide_state_key,
    posterior_loc_scale,
    select_parameters,
)
from bdiff.bayes.model import parse_guide_state_key
from bdiff.nets import UNet, UNetConfig

TINY = UNetConfig(base_channels=8, num_heads=2)


def make(layers="head", **kw) -> BayesianUNet:
    """sigma_0^2 = 1 unless given: the loss is then the per-image negative ELBO itself (the default 0.075 scales it)."""
    torch.manual_seed(0)
    kw.setdefault("mean_likelihood_var", 1.0)
    return BayesianUNet(UNet(TINY), BayesConfig(layers=layers, **kw))


def batch(b: int = 4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 1, 8, 8, generator=g)
    return x, torch.randint(0, 1000, (b,), generator=g), torch.randn(b, 1, 8, 8, generator=g)


def test_presets_exclude_norms_and_time_embedding() -> None:
    net = UNet(TINY)
    assert select_parameters(net, "none") == []
    assert select_parameters(net, "head") == ["head.weight", "head.bias"]
    decoder = select_parameters(net, "decoder")
    assert all(n.startswith(("up.", "head.")) for n in decoder) and "head.weight" in decoder
    every = select_parameters(net, "all")
    assert not any("norm" in n or n.startswith("time_embed") for n in every)
    assert "stem.weight" in every
    assert select_parameters(net, ["up.*.conv1.weight"]) == [n for n in decoder if n.endswith("conv1.weight")]


@pytest.mark.parametrize("layers", ["encoder", ["nothing.here"]])
def test_bad_selection_is_a_clear_error(layers) -> None:
    with pytest.raises(ValueError, match="bayes.layers"):
        select_parameters(UNet(TINY), layers)


def test_guide_starts_at_deterministic_weights_with_small_scale() -> None:
    net = UNet(TINY)
    torch.nn.init.normal_(net.head.weight, std=0.1)
    m = BayesianUNet(net, BayesConfig(layers="decoder", guide_init_scale=1e-3))
    params = dict(net.named_parameters())
    for name, (loc, scale) in m.posterior_loc_scale().items():
        torch.testing.assert_close(loc, params[name])
        torch.testing.assert_close(scale, torch.full_like(scale, 1e-3))


def test_prior_scale_and_center() -> None:
    net = UNet(TINY)
    torch.nn.init.normal_(net.head.weight, std=0.1)
    m = BayesianUNet(net, BayesConfig(layers="head", prior_scale=2.0, prior_center="init"))
    loc, scale = m.prior.prior("head.weight")
    fan_in = net.head.weight[0].numel()
    torch.testing.assert_close(loc, net.head.weight.detach())
    torch.testing.assert_close(scale, torch.full_like(scale, 2.0 / fan_in**0.5))
    loc0, _ = make("head", prior_center="zero").prior.prior("head.weight")
    assert loc0.abs().max() == 0


def test_deterministic_loss_is_per_image_nll() -> None:
    m = make("none")
    x, t, n = batch()
    loss, loglik = m.negative_elbo(x, t, n, num_data=1000)
    assert loglik.shape == (x.shape[0],) and not loglik.requires_grad
    torch.testing.assert_close(loss, -loglik.mean())


def test_kl_is_divided_by_dataset_size_monte_carlo() -> None:
    """E[loss] = NLL/B-average + kl_weight * KL(q||p) / N, with KL checked against closed form."""
    m = make("head", guide_init_scale=0.02)
    x, t, n = batch(2)
    num_data, beta = 50, 0.5
    est = []
    pyro.set_rng_seed(0)
    with torch.no_grad():
        for _ in range(400):
            loss, loglik = m.negative_elbo(x, t, n, num_data=num_data, kl_weight=beta)
            est.append((loss + loglik.mean()) * num_data / beta)
    est = torch.stack(est)
    kl = m.kl_divergence()
    assert abs(est.mean() - kl) < 4 * est.std() / len(est) ** 0.5 + 1e-3 * kl


def test_elbo_trains_guide_and_deterministic_weights() -> None:
    m = make("head")
    x, t, n = batch()
    m.negative_elbo(x, t, n, num_data=100).loss.backward()
    grads = {k: p.grad for k, p in m.named_parameters()}
    assert grads["guide.locs.head__weight_unconstrained"] is not None
    assert grads["guide.scales.head__weight_unconstrained"] is not None
    assert grads["net.stem.weight"] is not None


def test_models_do_not_share_pyro_params_and_survive_deepcopy() -> None:
    a, b = make("head"), make("head")
    with torch.no_grad():
        a.guide.locs.head__weight.add_(1.0)
    assert not torch.equal(a.guide.locs.head__weight, b.guide.locs.head__weight)
    assert len(pyro.get_param_store()) == 0
    c = copy.deepcopy(a)  # what EMA does
    x, t, n = batch()
    a.negative_elbo(x, t, n, num_data=10)  # original guide still bound to its model
    c.load_state_dict(a.state_dict())


def test_module_local_params_is_set_by_importing_the_package() -> None:
    assert pyro.settings.get("module_local_params") is True


def test_posterior_from_a_state_dict_matches_the_live_model() -> None:
    m = make("decoder", guide_init_scale=0.02)
    with torch.no_grad():
        m.guide.locs.head__weight_unconstrained.normal_()
    live = m.posterior_loc_scale()
    prefix = "denoiser.model."
    saved = posterior_loc_scale({prefix + k: v for k, v in m.state_dict().items()}, prefix)
    assert list(saved) == list(live) == m.bayesian_names
    for name, (loc, scale) in live.items():
        torch.testing.assert_close(saved[name][0], loc.detach())
        torch.testing.assert_close(saved[name][1], scale.detach())  # the constrained (softplus) scale
    assert posterior_loc_scale(m) is not None and posterior_loc_scale(m).keys() == live.keys()
    assert posterior_loc_scale(m.state_dict(), prefix) == {}  # no key carries the prefix


def test_guide_state_keys_are_the_saved_format() -> None:
    """The keys old checkpoints hold: AutoNormal's ``guide.{locs,scales}.<site>_unconstrained``."""
    assert guide_state_key("up.0.conv1.weight", "loc") == "guide.locs.up__0__conv1__weight_unconstrained"
    assert guide_state_key("head.bias", "scale") == "guide.scales.head__bias_unconstrained"
    m = make("decoder")
    keys = m.state_dict().keys()
    for name in m.bayesian_names:
        for kind in ("loc", "scale"):
            assert guide_state_key(name, kind) in keys
            assert parse_guide_state_key(guide_state_key(name, kind)) == (name, kind)
    assert parse_guide_state_key("net.head.weight") is None
    assert parse_guide_state_key("prior.head__weight_prior_loc") is None
    with pytest.raises(ValueError, match="guide.scales.head__weight_unconstrained"):
        posterior_loc_scale({"guide.locs.head__weight_unconstrained": torch.zeros(2)})


def test_nonfinite_likelihood_or_posterior_is_its_own_error() -> None:
    x, t, n = batch()
    m = make("head")
    with torch.no_grad():
        m.net.stem.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteElboError, match="log-likelihood .* for 4 of 4 images"):
        m.negative_elbo(x, t, n, num_data=100)
    m = make("head")
    with torch.no_grad():
        m.guide.locs.head__weight_unconstrained[0] = float("nan")  # Pyro refuses it in the guide
    with pytest.raises(NonFiniteElboError, match=r"posterior parameters \['head.weight'\]"):
        m.negative_elbo(x, t, n, num_data=100)
    assert issubclass(NonFiniteElboError, FloatingPointError)


def test_posterior_scale_parameters_are_the_guide_scales() -> None:
    m = make("decoder")
    named = {id(p): n for n, p in m.named_parameters()}
    assert sorted(named[id(p)] for p in m.posterior_scale_parameters()) == sorted(
        guide_state_key(name, "scale") for name in m.bayesian_names
    )


def test_bad_bayes_config() -> None:
    with pytest.raises(ValueError, match="prior_scale"):
        make("head", prior_scale=0.0)
    with pytest.raises(ValueError, match="predictive_samples"):
        make("head", predictive_samples=0)


def _head_grads(objective: str, **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient of the deterministic loss w.r.t. the head's eps rows, log_var rows and the stem."""
    m = make("none", objective=objective, **kw)
    torch.nn.init.normal_(m.net.head.weight, std=0.1)  # a non-zero variance head, so the NLL term acts
    x, t, n = batch()
    m.negative_elbo(x, t, n, num_data=100).loss.backward()
    g = m.net.head.weight.grad
    c = g.shape[0] // 2
    return g[:c], g[c:], m.net.stem.weight.grad


def test_objectives_send_each_term_where_the_docstring_says() -> None:
    """mse: no gradient to the variance head; hybrid: the mean sees exactly mse's gradient on the
    head's eps rows (stop-gradient), the variance rows see the NLL's; nll: both rows see the NLL."""
    mse_eps, mse_var, _ = _head_grads("mse")
    hyb_eps, hyb_var, _ = _head_grads("hybrid")
    nll_eps, nll_var, _ = _head_grads("nll")
    assert mse_var.abs().max() == 0 and mse_eps.abs().max() > 0
    torch.testing.assert_close(hyb_eps, mse_eps)
    torch.testing.assert_close(hyb_var, nll_var)
    assert (nll_eps - mse_eps).abs().max() > 1e-3  # the NLL reweights the mean's errors by 1/sigma^2


def test_hybrid_trains_the_trunk_as_a_plain_ddpm() -> None:
    """hybrid: the trunk's gradient is exactly mse's (the variance NLL reaches only the head);
    hybrid_shared: the NLL also reaches the trunk."""
    _, _, mse_stem = _head_grads("mse")
    _, _, hyb_stem = _head_grads("hybrid")
    _, shared_var, shared_stem = _head_grads("hybrid_shared")
    _, hyb_var, _ = _head_grads("hybrid")
    torch.testing.assert_close(hyb_stem, mse_stem)
    assert (shared_stem - mse_stem).abs().max() > 1e-4
    torch.testing.assert_close(hyb_var, shared_var)  # the head's variance rows see the same NLL either way


def test_objective_logliks_are_gaussian_log_densities() -> None:
    from bdiff.bayes.model import objective_loglik

    g = torch.Generator().manual_seed(3)
    noise, eps, log_var = (torch.randn(2, 1, 4, 4, generator=g) for _ in range(3))
    normal = torch.distributions.Normal
    exact = normal(eps, log_var.mul(0.5).exp()).log_prob(noise).flatten(1).sum(1)
    simple = normal(eps, torch.ones_like(eps)).log_prob(noise).flatten(1).sum(1)
    torch.testing.assert_close(objective_loglik(noise, eps, log_var, "nll"), exact)
    torch.testing.assert_close(objective_loglik(noise, eps, log_var, "mse"), simple)
    torch.testing.assert_close(objective_loglik(noise, eps, log_var, "hybrid"), simple + exact)
    torch.testing.assert_close(objective_loglik(noise, eps, log_var, "hybrid_shared"), simple + exact)


@pytest.mark.parametrize(
    "kw, match",
    [({"objective": "vlb"}, "bayes.objective"), ({"objective": "hybrid", "nll_beta": 0.5}, "nll_beta"),
     ({"mean_likelihood_var": 0.0}, "mean_likelihood_var"), ({"objective": "nll", "mean_likelihood_var": 0.1}, "mean_likelihood_var")],
)
def test_bad_objective_is_a_clear_error(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        BayesConfig(**kw).validate()


def test_nll_ignores_the_default_mean_likelihood_var() -> None:
    """objective: nll learns the variance: switching to it needs no other change (1.0 is accepted too)."""
    for kw in ({}, {"mean_likelihood_var": 1.0}):
        BayesConfig(objective="nll", **kw).validate()
    assert BayesConfig().mean_likelihood_var == 0.075  # the measured best for the hybrid objective


def test_mean_likelihood_var_tightens_the_posterior_not_the_gradient_scale() -> None:
    """sigma_0^2 scales the whole objective: the mean's gradient is L_simple's at any sigma_0^2 for a
    deterministic net, while with a Bayesian head the data outweigh the KL 1/sigma_0^2 times more."""
    _, _, stem_1 = _head_grads("hybrid")
    _, _, stem_01 = _head_grads("hybrid", mean_likelihood_var=0.1)
    torch.testing.assert_close(stem_01, stem_1)
    x, t, n = batch()
    kl_share = []
    for var in (1.0, 0.01):
        m = make("head", mean_likelihood_var=var, guide_init_scale=0.05)
        with torch.no_grad():
            m.guide.locs.head__weight_unconstrained.normal_(0, 0.05)
        pyro.set_rng_seed(0)
        data = m.negative_elbo(x, t, n, num_data=100, kl_weight=1e-6).loss.detach()  # ~likelihood only
        pyro.set_rng_seed(0)
        full = m.negative_elbo(x, t, n, num_data=100).loss.detach()
        kl_share.append(float((full - data) / full.abs()))
    assert kl_share[1] < kl_share[0] / 10
