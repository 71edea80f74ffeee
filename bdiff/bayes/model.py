"""Bayesian U-Net: chosen U-Net parameters carry mean-field Normal posteriors (Pyro).

Generative model for one minibatch of B noised images out of N training images
(Blundell et al. 2015, "Weight Uncertainty in Neural Networks"):

    w_j ~ N(m_j, s_j^2)                       for every Bayesian parameter j
    noise | x_t, t, w ~ likelihood chosen by ``BayesConfig.objective`` (see :func:`objective_loglik`)

with the likelihood inside ``pyro.plate("data", N, subsample=...)`` so it is
scaled by N/B. The guide is Pyro's ``AutoNormal`` (mean-field Normal, one
loc/scale per weight), initialised at the deterministic weights with a small
scale; the loss is ``TraceMeanField_ELBO`` divided by N: a per-image negative
ELBO = NLL per image + KL / N, so learning rates mean the same on any dataset.

Design choice: the U-Net stays a plain ``nn.Module`` and is called with
``torch.func.functional_call`` on the sampled weights. Only a small PyroModule
(:class:`WeightPrior`) declares one ``PyroSample`` per Bayesian parameter. This
keeps Pyro's bookkeeping off the deterministic layers (a full
``to_pyro_module_`` conversion wraps every submodule call) and lets the
posterior predictive evaluate the same plain network under ``torch.func.vmap``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_value
from pyro.nn import PyroModule, PyroSample
from torch import Tensor, nn
from torch.distributions import constraints, transform_to
from torch.func import functional_call

from bdiff.bayes.select import fan_in_std, parameter_name, select_parameters, site_name
from bdiff.nets import UNet

LOG_2PI = math.log(2 * math.pi)
OBJECTIVES = ("hybrid", "hybrid_shared", "nll", "mse")
DEFAULT_MEAN_LIKELIHOOD_VAR = 0.075  # the held-out eps MSE of the default digits model


@dataclass
class BayesConfig:
    """Which weights are Bayesian, their priors and the guide.

    Attributes:
        layers: preset (``none``, ``head``, ``decoder``, ``all``) or a list of glob
            patterns over U-Net parameter names.
        prior_scale: prior std of each Bayesian parameter is ``prior_scale / sqrt(fan_in)``
            of its layer (the scale of PyTorch's default init).
        prior_center: ``zero`` or ``init`` (centred on the deterministic / warm-start
            weights the model was built from).
        guide_init_scale: initial posterior std of every Bayesian weight (1e-3 to 1e-4
            keeps the first steps close to the deterministic network).
        objective: the likelihood the weights see (:func:`objective_loglik`): ``hybrid``
            (default; L_simple for the mean, NLL with a stop-gradient on the mean *and* on the
            trunk features for the variance head: the trunk is trained as a plain DDPM),
            ``hybrid_shared`` (IDDPM's L_hybrid with weight 1: the variance NLL also trains the
            trunk; measured worse), ``nll`` (exact heteroscedastic Gaussian, or beta-NLL with
            ``nll_beta``) or ``mse`` (L_simple only: a plain DDPM; the variance head is never
            trained and stays at variance 1).
        mean_likelihood_var: sigma_0^2, the fixed noise variance of the mean's Gaussian
            likelihood in the ``hybrid``/``hybrid_shared``/``mse`` objectives. It sets how much
            the data outweigh the KL for the weights the mean uses (the posterior's width), not
            the gradient scale: the loss is sigma_0^2 x the per-image negative ELBO, so learning
            rates and gradient clipping mean what they mean for a plain DDPM. Default 0.075: the
            maximum-likelihood value, the held-out eps MSE on the digits (docs/training.md, "The
            objective: hybrid"); 1 is L_simple's implicit choice. ``objective: nll`` learns the variance and
            ignores this; any value other than the default or 1 is then an error.
        nll_beta: only with ``objective: nll``. 0 gives the exact Gaussian likelihood.
            beta > 0 is the beta-NLL of Seitzer et al. 2022: each pixel's log-likelihood is
            weighted by stop_grad(sigma^(2 beta)), so the mean is not starved where the
            predicted variance is large (beta=1 gives the mean MSE-like gradients).
        predictive_samples: K, weight samples per posterior-predictive call.
        predictive: ``auto`` (closed form when only the head is Bayesian, else sampled),
            ``sampled`` or ``analytic``.
    """

    layers: str | list[str] = "head"
    prior_scale: float = 1.0
    prior_center: Literal["zero", "init"] = "zero"
    guide_init_scale: float = 1e-3
    objective: Literal["hybrid", "hybrid_shared", "nll", "mse"] = "hybrid"
    mean_likelihood_var: float = DEFAULT_MEAN_LIKELIHOOD_VAR
    nll_beta: float = 0.0
    predictive_samples: int = 8
    predictive: Literal["auto", "sampled", "analytic"] = "auto"

    def validate(self) -> None:
        if self.prior_scale <= 0:
            raise ValueError(f"bayes.prior_scale must be > 0, got {self.prior_scale}")
        if self.prior_center not in ("zero", "init"):
            raise ValueError(f"bayes.prior_center must be 'zero' or 'init', got {self.prior_center!r}")
        if not 0 < self.guide_init_scale < 1:
            raise ValueError(f"bayes.guide_init_scale must be in (0, 1), got {self.guide_init_scale}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"bayes.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not 0 <= self.nll_beta <= 1:
            raise ValueError(f"bayes.nll_beta must be in [0, 1], got {self.nll_beta}")
        if not 0 < self.mean_likelihood_var <= 1e3:
            raise ValueError(f"bayes.mean_likelihood_var must be in (0, 1000], got {self.mean_likelihood_var}")
        if self.objective == "nll" and self.mean_likelihood_var not in (1.0, DEFAULT_MEAN_LIKELIHOOD_VAR):
            raise ValueError(
                f"bayes.mean_likelihood_var={self.mean_likelihood_var} only applies to the hybrid/hybrid_shared/mse "
                "objectives (objective: nll learns the variance); leave it at its default or choose another objective"
            )
        if self.nll_beta and self.objective != "nll":
            raise ValueError(
                f"bayes.nll_beta={self.nll_beta} only applies to bayes.objective: nll (beta-NLL), but the "
                f"objective is {self.objective!r}; set nll_beta: 0 or objective: nll"
            )
        if self.predictive_samples < 1:
            raise ValueError(f"bayes.predictive_samples (K) must be >= 1, got {self.predictive_samples}")
        if self.predictive not in ("auto", "sampled", "analytic"):
            raise ValueError(f"bayes.predictive must be auto/sampled/analytic, got {self.predictive!r}")


class WeightPrior(PyroModule):
    """One ``PyroSample`` attribute per Bayesian parameter, with a Normal prior held in buffers.

    Calling the module samples every site once and returns ``{parameter_name: tensor}``.
    """

    def __init__(self, names: list[str], locs: list[Tensor], scales: list[float]) -> None:
        super().__init__()
        self.names = names
        for name, loc, scale in zip(names, locs, scales):
            key = site_name(name)
            # Buffers so the prior follows .to(device) and is saved with the model.
            self.register_buffer(f"{key}_prior_loc", loc.detach().clone())
            self.register_buffer(f"{key}_prior_scale", torch.tensor(float(scale)))
            setattr(self, key, PyroSample(functools.partial(WeightPrior._prior, key=key)))

    @staticmethod
    def _prior(module: WeightPrior, key: str) -> dist.Distribution:
        loc = getattr(module, f"{key}_prior_loc")
        scale = getattr(module, f"{key}_prior_scale").expand_as(loc)
        return dist.Normal(loc, scale).to_event(loc.dim())

    def prior(self, name: str) -> tuple[Tensor, Tensor]:
        """(loc, scale) of parameter ``name``'s prior, both shaped like the parameter."""
        key = site_name(name)
        loc = getattr(self, f"{key}_prior_loc")
        return loc, getattr(self, f"{key}_prior_scale").expand_as(loc)

    def forward(self) -> dict[str, Tensor]:
        return {name: getattr(self, site_name(name)) for name in self.names}


class _AutoNormal(AutoNormal):
    """``AutoNormal`` whose pickling leaves the original guide usable.

    Pyro's ``AutoGuide.__getstate__`` sets ``self._model = None`` on the object being
    copied, so ``copy.deepcopy(module)`` (done by EMA / ``AveragedModel``) would detach
    the *original* guide from its model. We restore it after the state is taken.
    """

    def __getstate__(self) -> dict:
        model, master = self._model, self.master
        state = super().__getstate__()
        self._model, self.master = model, master
        return state


# AutoNormal's state-dict format, known here and nowhere else: parameter ``up.0.conv1.weight``'s
# posterior is saved as ``guide.locs.up__0__conv1__weight_unconstrained`` (the loc itself: real
# constraint) and ``guide.scales.up__0__conv1__weight_unconstrained`` (softplus^-1 of the scale).
_GUIDE_FIELDS: dict[str, tuple[str, constraints.Constraint]] = {
    "loc": ("locs", constraints.real),
    "scale": ("scales", _AutoNormal.scale_constraint),
}
_UNCONSTRAINED = "_unconstrained"


def guide_state_key(name: str, kind: Literal["loc", "scale"]) -> str:
    """Key of parameter ``name``'s posterior ``loc`` or ``scale`` in a :class:`BayesianUNet`'s state dict.

    Example:
        >>> guide_state_key("head.weight", "scale")
        'guide.scales.head__weight_unconstrained'
    """
    return f"guide.{_GUIDE_FIELDS[kind][0]}.{site_name(name)}{_UNCONSTRAINED}"


def parse_guide_state_key(key: str) -> tuple[str, Literal["loc", "scale"]] | None:
    """Inverse of :func:`guide_state_key`: ``(parameter_name, kind)``, or None for any other key."""
    for kind, (field, _) in _GUIDE_FIELDS.items():
        prefix = f"guide.{field}."
        if key.startswith(prefix) and key.endswith(_UNCONSTRAINED):
            return parameter_name(key[len(prefix) : -len(_UNCONSTRAINED)]), kind  # type: ignore[return-value]
    return None


def posterior_loc_scale(
    source: BayesianUNet | Mapping[str, Tensor], prefix: str = ""
) -> dict[str, tuple[Tensor, Tensor]]:
    """{parameter_name: (loc, scale)} of the mean-field posterior, from a live model or a saved state dict.

    Args:
        source: a :class:`BayesianUNet` (its :meth:`~BayesianUNet.posterior_loc_scale`), or a state
            dict holding one's tensors, e.g. a checkpoint's ``state_dict`` (no model is built).
        prefix: the BayesianUNet's key prefix inside a state dict (``bdiff.checkpoint.MODEL_PREFIX``
            for checkpoints written by ``train.py``); ignored for a live model.

    Raises:
        ValueError: a state dict holds a posterior loc without its scale or the reverse.

    Example:
        >>> post = posterior_loc_scale(read_checkpoint(path)["state_dict"], MODEL_PREFIX)
        >>> loc, scale = post["head.weight"]
    """
    if isinstance(source, BayesianUNet):
        return source.posterior_loc_scale()
    found: dict[str, dict[str, Tensor]] = {}
    for key, value in source.items():
        parsed = parse_guide_state_key(key[len(prefix) :]) if key.startswith(prefix) else None
        if parsed is not None:
            name, kind = parsed
            found.setdefault(name, {})[kind] = transform_to(_GUIDE_FIELDS[kind][1])(value)
    for name, fields in found.items():
        if len(fields) != 2:
            missing = ({"loc", "scale"} - fields.keys()).pop()
            raise ValueError(f"the state dict has no {prefix + guide_state_key(name, missing)!r} (posterior {missing})")
    return {name: (fields["loc"], fields["scale"]) for name, fields in found.items()}


class NonFiniteElboError(FloatingPointError):
    """The negative ELBO cannot be computed: the log-likelihood or the posterior parameters hold NaN/inf."""


class NegativeElbo(NamedTuple):
    """What :meth:`BayesianUNet.negative_elbo` returns."""

    loss: Tensor  # per-image negative ELBO times ``loss_scale``: scalar, differentiable
    loglik: Tensor  # per-image log-likelihood of the objective (B,), detached (for logging)


def gaussian_loglik(noise: Tensor, eps: Tensor, log_var: Tensor, beta: float = 0.0) -> Tensor:
    """Per-image log N(noise; eps, exp(log_var)), summed over pixels: (B,C,H,W) -> (B,).

    With beta > 0, each pixel is weighted by stop_grad(exp(log_var))**beta (beta-NLL).
    """
    ll = -0.5 * (LOG_2PI + log_var + (noise - eps) ** 2 * torch.exp(-log_var))
    if beta > 0:
        ll = ll * torch.exp(beta * log_var).detach()
    return ll.flatten(1).sum(1)


def objective_loglik(
    noise: Tensor, eps: Tensor, log_var: Tensor, objective: str, beta: float = 0.0, mean_var: float = 1.0
) -> Tensor:
    """The per-image log-likelihood the weights are trained on: (B,C,H,W) x 3 -> (B,).

    * ``nll``: log N(noise; eps, exp(log_var)) (beta-NLL when ``beta > 0``). Exact, but each
      pixel's error is weighted by 1/sigma^2, so the easy high-noise pixels dominate and the
      mean is starved where the noise is hard to predict (Seitzer et al. 2022); on the
      digits this costs 2.5-11x in FD (docs/training.md, "The objective: hybrid").
    * ``mse``: log N(noise; eps, mean_var I), i.e. L_simple of Ho et al. 2020 up to scale. The
      log_var output gets no gradient (its zero-initialised head weights stay 0: variance 1).
    * ``hybrid`` / ``hybrid_shared``: log N(noise; eps, mean_var I) + log N(noise; stop_grad(eps),
      exp(log_var)) -- the L_hybrid split of Nichol & Dhariwal 2021: the mean is trained by
      L_simple, the variance by the exact NLL around the (fixed) mean. With ``hybrid`` the
      caller also computes log_var from detached trunk features
      (``UNet(..., detach_variance_features=True)``), so the NLL trains only the head: its
      gradient, 0.5 (1 - err^2/sigma^2) per pixel, is O(1) at every t while L_simple's is tiny
      at high noise, and when it reaches the trunk (``hybrid_shared``) it starves the mean as
      the exact NLL does (same section). IDDPM damps it with a weight of 0.001 instead; with
      a Bayesian head that weight would let the KL pin the variance weights to the prior.

    Why the weight posterior is still an ELBO's: each of the two terms is a proper Gaussian
    log-density of the observed noise, so ``nll``/``mse`` are ordinary likelihoods and the
    ``hybrid`` factor is a composite likelihood (a product of two Gaussian densities of the same
    observation, one with unit variance for the mean, one with the head's variance for the log
    variance). The variational objective -E_q[log factor] + KL(q || p) is then the ELBO of the
    generalised (Gibbs) posterior p(w) exp(log factor) (Bissiri et al. 2016; Knoblauch et al.
    2019); the stop-gradient only decides which parameters each term's gradient reaches, so
    the mean's weights see a fixed-variance Gaussian likelihood and the variance head's
    weights see the exact NLL.
    """
    if objective == "nll":
        return gaussian_loglik(noise, eps, log_var, beta)
    simple = gaussian_loglik(noise, eps, torch.full_like(log_var, math.log(mean_var)))
    if objective == "mse":
        return simple
    if objective in ("hybrid", "hybrid_shared"):
        return simple + gaussian_loglik(noise, eps.detach(), log_var)
    raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")


class BayesianUNet(nn.Module):
    """A U-Net with a Pyro weight posterior over chosen parameters.

    Attributes:
        net: the plain U-Net; its Bayesian parameters hold the initial means only.
        prior: :class:`WeightPrior` with one sample site per Bayesian parameter.
        guide: ``AutoNormal`` guide (mean-field Normal), created eagerly.
        bayesian_names: dotted names of the Bayesian parameters of ``net``.

    Example:
        >>> from bdiff.nets import UNetConfig
        >>> m = BayesianUNet(UNet(UNetConfig()), BayesConfig(layers="head"))
        >>> x = torch.randn(4, 1, 8, 8); t = torch.randint(0, 1000, (4,))
        >>> loss, loglik = m.negative_elbo(x, t, torch.randn_like(x), num_data=1000)
    """

    def __init__(self, net: UNet, config: BayesConfig) -> None:
        super().__init__()
        config.validate()  # Pyro's module_local_params is set once in bdiff/bayes/__init__.py
        self.config = config
        self.net = net
        self.bayesian_names = select_parameters(net, config.layers)
        params = dict(net.named_parameters())
        init = {name: params[name].detach().clone() for name in self.bayesian_names}
        locs = [init[n] if config.prior_center == "init" else torch.zeros_like(init[n]) for n in self.bayesian_names]
        scales = [config.prior_scale * fan_in_std(net, n) for n in self.bayesian_names]
        self.prior = WeightPrior(self.bayesian_names, locs, scales)
        self.guide = _AutoNormal(
            self.model,
            init_loc_fn=init_to_value(values={site_name(n): v for n, v in init.items()}),
            init_scale=config.guide_init_scale,
        )
        self._elbo = TraceMeanField_ELBO(max_plate_nesting=1)
        self._warm_up_guide()

    @property
    def is_bayesian(self) -> bool:
        return bool(self.bayesian_names)

    def _warm_up_guide(self) -> None:
        """Create the guide's lazy parameters now (under no_grad, see NOTES.md)."""
        c, s = self.net.config.in_channels, self.net.config.image_size
        x = torch.zeros(1, c, s, s)
        with torch.no_grad():
            self.guide(x, torch.zeros(1, dtype=torch.long), x, 1)

    def model(self, x_t: Tensor, t: Tensor, noise: Tensor, num_data: int, kl_weight: float = 1.0) -> Tensor:
        """Pyro model: weights from the prior, noise likelihood in a data plate. Returns loglik (B,).

        Raises:
            NonFiniteElboError: the log-likelihood is NaN/inf for some image (checked here, before
                Pyro's validation of the factor would refuse it with a ``ValueError``).
        """
        with poutine.scale(scale=kl_weight):
            weights = self.prior()
        detach = {"detach_variance_features": self.config.objective == "hybrid"}
        eps, log_var = functional_call(self.net, weights, (x_t, t), detach, strict=False)
        cfg = self.config
        loglik = objective_loglik(noise, eps, log_var, cfg.objective, cfg.nll_beta, cfg.mean_likelihood_var)
        finite = torch.isfinite(loglik)
        if not finite.all():
            raise NonFiniteElboError(
                f"non-finite log-likelihood (network output) for {int((~finite).sum())} of {len(loglik)} images"
            )
        subsample = torch.arange(x_t.shape[0], device=x_t.device)
        with pyro.plate("data", num_data, subsample=subsample):
            pyro.factor("noise_loglik", loglik)
        return loglik

    def _scaled_guide(self, *args: object, kl_weight: float = 1.0) -> dict[str, Tensor]:
        with poutine.scale(scale=kl_weight):
            return self.guide(*args)

    def negative_elbo(
        self, x_t: Tensor, t: Tensor, noise: Tensor, num_data: int, kl_weight: float = 1.0
    ) -> NegativeElbo:
        """Per-image negative ELBO -(N/B sum_b loglik_b - kl_weight * KL) / N times ``loss_scale``, and loglik (B,).

        ``kl_weight`` (KL warm-up) scales the prior and guide terms of the weights.

        Raises:
            NonFiniteElboError: NaN/inf log-likelihood or posterior parameters.
        """
        if num_data < x_t.shape[0]:
            raise ValueError(f"num_data={num_data} is smaller than the batch ({x_t.shape[0]})")
        logliks: list[Tensor] = []  # the model's return value, which Pyro's ELBO discards

        def model(*args: object) -> Tensor:
            logliks.append(self.model(*args, kl_weight=kl_weight))
            return logliks[-1]

        guide = functools.partial(self._scaled_guide, kl_weight=kl_weight)
        try:
            loss = self._elbo.differentiable_loss(model, guide, x_t, t, noise, num_data)
        except ValueError as e:  # the guide's Normal validation refuses NaN locs or scales
            bad = [
                name
                for name, (loc, scale) in self.posterior_loc_scale().items()
                if not (torch.isfinite(loc).all() and torch.isfinite(scale).all())
            ]
            if bad:
                raise NonFiniteElboError(f"non-finite posterior parameters {bad[:3]}") from e
            raise
        return NegativeElbo(loss / num_data * self.loss_scale, logliks[-1].detach())

    @property
    def loss_scale(self) -> float:
        """sigma_0^2 for the fixed-variance objectives, else 1: a positive factor on the whole objective
        (same optimum), so the mean's gradients have L_simple's scale whatever ``mean_likelihood_var`` is."""
        return 1.0 if self.config.objective == "nll" else self.config.mean_likelihood_var

    def posterior_loc_scale(self) -> dict[str, tuple[Tensor, Tensor]]:
        """{parameter_name: (loc, scale)} of the mean-field posterior, each shaped like the parameter."""
        return {
            name: (getattr(self.guide.locs, site_name(name)), getattr(self.guide.scales, site_name(name)))
            for name in self.bayesian_names
        }

    def posterior_scale_parameters(self) -> list[nn.Parameter]:
        """The trainable (unconstrained) parameters behind the posterior scales, e.g. for their own learning rate."""
        return list(self.guide.scales.parameters())

    def kl_divergence(self) -> Tensor:
        """Closed-form KL(q || p) summed over all Bayesian weights (for logging). Scalar."""
        total = torch.zeros(())
        for name, (loc, scale) in self.posterior_loc_scale().items():
            p_loc, p_scale = self.prior.prior(name)
            kl = torch.distributions.kl_divergence(
                torch.distributions.Normal(loc, scale), torch.distributions.Normal(p_loc, p_scale)
            )
            total = total.to(kl.device) + kl.sum()
        return total
