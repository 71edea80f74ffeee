"""The training-time preview: deterministic DDIM (Song et al. 2021, eta = 0) and a Monte Carlo uncertainty map.

Both run the :class:`~bdiff.sampling.Sampler` with the DDIM stepper. The Monte Carlo map
(:func:`chain_variance`) runs the same starting noise through K chains, each with its own weight
sample (a chain-major ``chains`` Denoiser), and takes the per-pixel variance over chains. The
cheap alternative, when K chains do not fit the preview's time budget, is the Sampler's propagated
variance (Tweedie's identity, no extra call; :func:`ddim_sample_and_variance`); a first-order
propagation that ignores Cov(x_t, eps_hat) is off 100x on the digits model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from bdiff.checks import as_integer
from bdiff.denoiser import Denoiser
from bdiff.sampling.noise import NoiseSource
from bdiff.sampling.sampler import Sampler, SamplerCallback
from bdiff.sampling.steppers import DDIM


@torch.no_grad()
def ddim_sample_and_variance(
    denoiser: Denoiser, x_T: Tensor, steps: int = 50, clip: bool = True, callbacks: Sequence[SamplerCallback] = ()
) -> tuple[Tensor, Tensor, Tensor]:
    """DDIM from ``x_T`` (B,C,H,W): (x_0 (B,C,H,W), its propagated variance (B,C,H,W), NFE per sample (B,)).

    The variance is the :class:`~bdiff.sampling.Sampler`'s propagated posterior variance of the
    final image (Tweedie propagation, no extra denoiser call; zero for a deterministic denoiser).
    ``callbacks`` (e.g. a progress counter) see every step.
    """
    state = Sampler(denoiser, DDIM(), steps, callbacks=list(callbacks)).run(
        x_T, NoiseSource(0, range(x_T.shape[0]))
    )
    return (state.x.clamp(-1, 1) if clip else state.x), state.var, state.nfe


@torch.no_grad()
def chain_variance(
    chains: Denoiser,
    num_chains: int,
    x_T: Tensor,
    steps: int = 50,
    clip: bool = True,
    callbacks: Sequence[SamplerCallback] = (),
) -> Tensor:
    """Per-pixel variance over ``num_chains`` DDIM chains from the same noise x_T (B,C,H,W) -> (B,C,H,W).

    ``chains`` takes a chain-major batch of num_chains * B images (see
    :class:`bdiff.bayes.predictive.PosteriorChains`). Unbiased over chains.
    """
    as_integer("chain_variance num_chains", num_chains, 2)
    x0 = ddim_sample_and_variance(chains, x_T.repeat(num_chains, 1, 1, 1), steps, clip, callbacks)[0]
    return x0.unflatten(0, (num_chains, -1)).var(0)
