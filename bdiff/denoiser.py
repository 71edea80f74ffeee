"""The seam between the Bayesian model and the samplers (DESIGN.md).

Samplers only see a :class:`Denoiser`: something with a noise schedule whose
``predict(x_t, t)`` returns a :class:`Prediction`. A deterministic network is a
Denoiser with zero variances, so every sampler also runs without Bayes.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

from torch import Tensor

from bdiff.schedule import NoiseSchedule


class Prediction(NamedTuple):
    """Posterior-predictive noise prediction at (x_t, t); every field (B,C,H,W).

    eps: posterior-mean noise prediction E_q(w)[eps_hat].
    var_epistemic: Var_q(w)[eps_hat], spread of the mean over weight samples.
    var_aleatoric: E_q(w)[sigma^2], the variance head's noise variance.
    """

    eps: Tensor
    var_epistemic: Tensor
    var_aleatoric: Tensor

    @property
    def var_total(self) -> Tensor:
        """Total predictive variance (law of total variance), (B,C,H,W)."""
        return self.var_epistemic + self.var_aleatoric


@runtime_checkable
class Denoiser(Protocol):
    """Anything that predicts noise with its uncertainty under a schedule."""

    schedule: NoiseSchedule
    image_shape: tuple[int, int, int]  # (C, H, W)

    def predict(self, x_t: Tensor, t: Tensor) -> Prediction:
        """x_t (B,C,H,W) in the model's scale, t (B,) integer timesteps."""
        ...
