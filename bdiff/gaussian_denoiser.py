"""The exact denoiser of Gaussian data: the best *linear* denoiser of any data with that mean and covariance.

For data x0 ~ N(mu, Sigma) and x_t = sqrt(a) x0 + sqrt(1-a) eps, the posterior is Gaussian with

    E[x0 | x_t]   = mu + sqrt(a) Sigma (a Sigma + (1-a) I)^{-1} (x_t - sqrt(a) mu),
    Cov[x0 | x_t] = (1-a) Sigma (a Sigma + (1-a) I)^{-1}.

For data of any distribution with mean mu and covariance Sigma, the same formulas give the linear
minimum-mean-squared-error estimator of x0 from x_t and its error covariance (the Wiener filter),
so :class:`GaussianDenoiser` fitted to a training set is the strongest denoiser that needs no
network. At high noise the MMSE denoiser of real images is close to it (Wang & Vastola 2023,
"The Hidden Linear Structure in Score-Based Models and its Application", where it replaces the
first sampling steps); where a trained network errs more than it, the network is worse than the
data's first two moments.

In the eigenbasis Sigma = U diag(lambda) U^T every direction is denoised on its own, with gain
g = sqrt(a) lambda / (a lambda + 1 - a) and error variance e = (1-a) lambda / (a lambda + 1 - a).
Images of more than ``FULL_RANK_MAX_DIM`` values keep the leading ``rank`` principal directions
and one isotropic variance for the rest (probabilistic PCA, Tipping & Bishop 1999), so memory
stays O(D * rank).

Written here because no library we use offers a Wiener-filter denoiser under a diffusion
schedule; it is one eigendecomposition and two matrix products.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bdiff.denoiser import Prediction
from bdiff.schedule import NoiseSchedule

FULL_RANK_MAX_DIM = 4096  # up to 64x64 grey or 3x32x32 colour: the exact covariance (a D x D eigendecomposition)
LOW_RANK = 1024  # principal directions kept above FULL_RANK_MAX_DIM
STORED_RANK = 512  # principal directions a checkpoint keeps (float32): 6 MB at 3x32x32


class GaussianDenoiser:
    """E[x0 | x_t] and Var[x0 | x_t] of N(mean, U diag(eigenvalues) U^T + residual (I - U U^T)) (module docstring).

    A :class:`~bdiff.denoiser.Denoiser`: its ``predict`` returns the exact eps and, as the aleatoric
    variance, the diagonal of Var[eps | x_t]; the epistemic variance is 0 (nothing is learned but two moments).

    Args:
        schedule: the noise schedule.
        mean: the data mean (C,H,W).
        basis: orthonormal principal directions (D, k), D = C*H*W.
        eigenvalues: the data variance along each (k,), >= 0.
        residual: the variance in every direction outside the basis (0 when k = D).
    """

    def __init__(self, schedule: NoiseSchedule, mean: Tensor, basis: Tensor, eigenvalues: Tensor,
                 residual: float = 0.0) -> None:
        dim = mean.numel()
        if basis.shape[0] != dim or basis.dim() != 2 or eigenvalues.shape != (basis.shape[1],):
            raise ValueError(f"GaussianDenoiser: basis must be ({dim}, k) and eigenvalues (k,), got "
                             f"{tuple(basis.shape)} and {tuple(eigenvalues.shape)}")
        if residual < 0 or bool((eigenvalues < 0).any()):
            raise ValueError("GaussianDenoiser: variances must be >= 0")
        self.schedule = schedule
        self.image_shape = tuple(mean.shape)
        self.residual = float(residual)
        self.mean, self.basis, self.eigenvalues = mean.double(), basis.double(), eigenvalues.double()
        self.basis_sq = self.basis.T**2  # (k, D): each direction's share of each pixel
        self.leverage = self.basis_sq.sum(0)  # (D,): each pixel's share inside the basis

    def to(self, device: torch.device | str) -> GaussianDenoiser:
        """This denoiser with its moments on ``device`` (and the schedule's, which it shares)."""
        return GaussianDenoiser(self.schedule, self.mean.to(device), self.basis.to(device), self.eigenvalues.to(device),
                                self.residual)

    def to_dict(self, max_rank: int = STORED_RANK) -> dict[str, Any]:
        """Plain tensors for a checkpoint: the leading ``max_rank`` directions in float32 (the rest of the variance
        joins ``residual``), so a 3x32x32 model stores 6 MB, not a 3072x3072 basis."""
        order = self.eigenvalues.argsort(descending=True)
        keep, rest = order[:max_rank], order[max_rank:]
        dim = self.mean.numel()
        residual = self.residual
        if len(rest):
            outside = self.residual * (dim - self.basis.shape[1])
            residual = (float(self.eigenvalues[rest].sum()) + outside) / (dim - len(keep))
        return {"mean": self.mean.float().cpu(), "basis": self.basis[:, keep].float().cpu(),
                "eigenvalues": self.eigenvalues[keep].float().cpu(), "residual": residual}

    @classmethod
    def from_dict(cls, d: dict[str, Any], schedule: NoiseSchedule) -> GaussianDenoiser:
        return cls(schedule, d["mean"], d["basis"], d["eigenvalues"], float(d["residual"]))

    @classmethod
    def fit(cls, images: Tensor, schedule: NoiseSchedule, rank: int | None = None) -> GaussianDenoiser:
        """Fit the mean and covariance of ``images`` (N,C,H,W) in the model's [-1, 1] scale.

        ``rank`` None: the exact covariance for D = C*H*W <= FULL_RANK_MAX_DIM, else LOW_RANK directions.
        With a rank: the leading ``rank`` directions (randomised SVD, Halko et al. 2011,
        ``torch.svd_lowrank``) and the mean variance of the rest. ~5 s for 6,000 images of 3x32x32
        on 2 CPU cores.
        """
        if images.dim() != 4 or len(images) < 2:
            raise ValueError(f"GaussianDenoiser.fit needs >= 2 images (N,C,H,W), got shape {tuple(images.shape)}")
        x = images.flatten(1).double()
        mean = x.mean(0)
        x = x - mean
        n, dim = x.shape
        if rank is None and dim <= FULL_RANK_MAX_DIM:
            eigenvalues, basis = torch.linalg.eigh(x.T @ x / (n - 1))
            return cls(schedule, mean.view(images.shape[1:]), basis, eigenvalues.clamp(min=0), 0.0)
        k = min(rank or LOW_RANK, n - 1, dim)
        if k < 1:
            raise ValueError(f"GaussianDenoiser.fit: rank must be >= 1, got {rank}")
        with torch.random.fork_rng(devices=[]):  # svd_lowrank draws its test matrix from the global stream
            torch.manual_seed(0)
            _, s, v = torch.svd_lowrank(x, q=k, niter=4)
        eigenvalues = s**2 / (n - 1)
        total = float((x**2).sum()) / (n - 1)
        residual = max(0.0, (total - float(eigenvalues.sum())) / (dim - k))
        return cls(schedule, mean.view(images.shape[1:]), v, eigenvalues, residual)

    def _filter(self, d: Tensor, per_direction: Tensor, outside: Tensor) -> Tensor:
        """Apply per-direction factors (B,k) inside the basis and ``outside`` (B,1) beyond it to d (B,D)."""
        coeffs = d @ self.basis
        inside = (coeffs * per_direction) @ self.basis.T
        return inside + outside * (d - coeffs @ self.basis.T)

    def posterior(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(E[x0 | x_t], diagonal of Cov[x0 | x_t]), each (B,C,H,W) in x_t's dtype; x_t (B,C,H,W), t (B,)."""
        a = self.schedule.alpha_bar(t).to(self.mean.device).unsqueeze(1)  # (B,1) float64
        lam, s2 = self.eigenvalues.unsqueeze(0), torch.tensor(self.residual, dtype=torch.float64, device=a.device)
        denom, denom_out = a * lam + 1 - a, a * s2 + 1 - a
        d = x_t.flatten(1).to(a) - a.sqrt() * self.mean.flatten()
        x0 = self.mean.flatten() + self._filter(d, a.sqrt() * lam / denom, a.sqrt() * s2 / denom_out)
        err, err_out = (1 - a) * lam / denom, (1 - a) * s2 / denom_out  # (B,k), (B,1)
        var = err @ self.basis_sq + err_out * (1 - self.leverage)
        return x0.view_as(x_t).to(x_t.dtype), var.clamp(min=0).view_as(x_t).to(x_t.dtype)

    def predict(self, x_t: Tensor, t: Tensor) -> Prediction:
        """The exact Prediction: eps = (x_t - sqrt(a) E[x0|x_t]) / sqrt(1-a), aleatoric a/(1-a) Var[x0|x_t]. (B,C,H,W)."""
        x0, var_x0 = self.posterior(x_t, t)
        a = self.schedule.alpha_bar(t, x_t)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return Prediction(eps, torch.zeros_like(eps), a / (1 - a) * var_x0)
