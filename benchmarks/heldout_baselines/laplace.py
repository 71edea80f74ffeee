"""Full-covariance posterior of the head's eps weights in closed form (last-layer Laplace / BLR).

The head is a 3x3 conv, so each eps output channel c at pixel p is linear in its weights:

    eps_c(p) = w_c . phi(p),    phi(p) = [3x3 patch of the trunk features h at p, 1]   (D = 9 C_h + 1)

With the trunk fixed at its trained weights and the Gaussian likelihood of the variance head,
noise_c(p) ~ N(w_c . phi(p), sigma_c^2(p)), the posterior of w_c under a N(w_MAP, alpha^-1 I)
prior is Gaussian with precision

    Lambda_c = alpha I + N * E_{x0, t, noise}[ sum_p phi(p) phi(p)^T / sigma_c^2(p) ]

(Bayesian linear regression on the trunk's features weighted by the aleatoric precision; the
generalised Gauss-Newton Laplace approximation of the head, MacKay 1992; Daxberger et al. 2021
"Laplace Redux" for last layers). N counts *images*, not pixels or (t, noise) draws: each
image's Fisher is averaged over t ~ U{0..T-1} and noise, then multiplied by the number of
training images, as the per-image ELBO of :mod:`bdiff.bayes.model` does. The predictive
epistemic variance is phi^T Lambda_c^-1 phi: large where the features point in directions the
training data did not fill. No sampling is needed.

Hand-written because no library fits it: laplace-torch's last-layer Laplace assumes a fully
connected last layer (its issue 118), and Pyro's ``AutoLaplaceApproximation`` inverts a dense
Hessian of one batch's loss rather than accumulating the expected Fisher over the data.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from bdiff.bayes.head import head_at
from bdiff.bayes.model import BayesianUNet
from bdiff.denoiser import Prediction
from bdiff.schedule import NoiseSchedule


def head_patches(h: Tensor, kernel_size: int = 3) -> Tensor:
    """Trunk features (B,C_h,H,W) -> phi (B, D, H*W): every pixel's conv patch, plus a constant 1 for the bias."""
    patches = F.unfold(h, kernel_size, padding=kernel_size // 2)
    return torch.cat([patches, torch.ones_like(patches[:, :1])], dim=1)


class HeadLaplace(nn.Module):
    """Gaussian posterior over the eps half of the head: N(w_mean, Lambda_c^-1) per output channel c.

    ``predict`` is a :class:`~bdiff.denoiser.Denoiser`: eps and the aleatoric variance from the
    network at the posterior-mean weights, epistemic = phi^T Lambda_c^-1 phi per pixel.

    Args:
        model: the trained Bayesian U-Net (its posterior means are the Laplace centre).
        schedule: the noise schedule.
        fisher: (C, D, D), mean per-image Fisher of the eps weights (:func:`head_fisher`).
        num_data: N, training images.
        prior_precision: alpha.
    """

    def __init__(
        self, model: BayesianUNet, schedule: NoiseSchedule, fisher: Tensor, num_data: int, prior_precision: float
    ) -> None:
        super().__init__()
        self.model, self.schedule = model, schedule
        self.num_data, self.prior_precision = num_data, prior_precision
        eye = torch.eye(fisher.shape[-1], dtype=torch.float64)
        precision = num_data * fisher.double() + prior_precision * eye
        # Sigma = Lambda^-1 = L L^T; var = |L^T phi|^2. Cholesky of the inverse via the precision's.
        self.register_buffer("cov_chol", torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(precision))).float())
        self.weights = {name: loc for name, (loc, _) in model.posterior_loc_scale().items()}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.model.net.config
        return (c.in_channels, c.image_size, c.image_size)

    def predict(self, x_t: Tensor, t: Tensor) -> Prediction:
        """x_t (B,C,H,W), t (B,) -> Prediction with the closed-form epistemic variance."""
        net = self.model.net
        h = trunk_features(net, self.weights, x_t, t)
        eps, log_var = head_at(net, self.weights, h)
        z = torch.einsum("cde,bdp->bcep", self.cov_chol, head_patches(h))
        var_epistemic = z.pow(2).sum(2).reshape(eps.shape)
        return Prediction(eps, var_epistemic, log_var.exp())


class _Trunk(nn.Module):
    """``net.features`` as a module's forward, so ``functional_call`` can substitute trunk weights."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.net.features(x_t, t)


def trunk_features(net: nn.Module, weights: dict[str, Tensor], x_t: Tensor, t: Tensor) -> Tensor:
    """The trunk's features (B,C_h,H,W) at the posterior-mean ``weights`` of any Bayesian trunk layers."""
    trunk = {f"net.{k}": v for k, v in weights.items() if not k.startswith("head.")}
    if not trunk:
        return net.features(x_t, t)
    return functional_call(_Trunk(net), trunk, (x_t, t), strict=False)


@torch.no_grad()
def head_fisher(
    model: BayesianUNet,
    schedule: NoiseSchedule,
    images: Iterable[Tensor],
    draws: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int]:
    """Mean per-image Fisher of the eps head weights, E[sum_p phi phi^T / sigma_c^2(p)]: (C, D, D).

    ``images``: batches x0 (B,C,H,W) in [-1,1] (the training images); each is noised ``draws``
    times at t ~ U{0..T-1}. Returns (fisher, number of images seen).
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    weights = {name: loc for name, (loc, _) in model.posterior_loc_scale().items()}
    net = model.net
    fisher, count = None, 0
    for x0 in images:
        for _ in range(draws):
            t = torch.randint(0, schedule.timesteps, (x0.shape[0],), generator=generator).to(x0.device)
            noise = torch.randn(x0.shape, generator=generator).to(x0)
            h = trunk_features(net, weights, schedule.q_sample(x0, t, noise), t)
            log_var = head_at(net, weights, h)[1]  # (B,C,H,W)
            phi = head_patches(h).double()  # (B,D,P)
            precision = torch.exp(-log_var).flatten(2).double()  # (B,C,P)
            part = torch.einsum("bdp,bcp,bep->cde", phi, precision, phi)
            fisher = part if fisher is None else fisher + part
        count += x0.shape[0]
    if fisher is None:
        raise ValueError("head_fisher needs at least one batch of images")
    return (fisher / (count * draws)).float(), count


def default_prior_precision(model: BayesianUNet) -> float:
    """fan_in of the head (9 C_h): the precision of the model's prior scale 1/sqrt(fan_in) at prior_scale 1."""
    return float(model.net.head.weight[0].numel()) / model.config.prior_scale**2
