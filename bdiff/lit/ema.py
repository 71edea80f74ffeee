"""EMA of the weights with torch's multi-tensor update: Lightning's EMAWeightAveraging, one kernel per dtype.

Lightning's :class:`~lightning.pytorch.callbacks.EMAWeightAveraging` hands
:class:`torch.optim.swa_utils.AveragedModel` the per-tensor ``get_ema_avg_fn``, so every
optimizer step launches one small update per parameter and buffer (~140 for the digits
U-Net): 3-6 ms a step on 2 CPU cores against ~1 ms (benchmarks/training_step_cost.py). torch's own
``get_ema_multi_avg_fn`` does the same average, ema <- ema + (1 - decay) (w - ema), with
one ``_foreach_lerp_`` per device and dtype. Lightning offers no switch for it, so this
class is the same callback built on :class:`~lightning.pytorch.callbacks.WeightAveraging`
with the multi-tensor function; everything else (when to update, swapping the average in for
validation and at the end of fit, checkpoints) is Lightning's.

A constant decay averages over a fixed number of steps (~1/(1 - decay)), so in a short run the
average still holds the early, poorly trained weights: on the digits, 2,100 steps with decay
0.999 (12% of the initial weights left in the average) sample at 40-170x the FD of the optimizer's
own weights (BENCHMARKS.md, "Training time"). ``sigma_rel`` gives the *power-function* EMA of EDM2 (Karras
et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", Sec. 3.1):
decay_t = (1 - 1/t)^(gamma + 1) at update t, whose averaging window is a fixed fraction of the
run (its relative standard deviation ``sigma_rel``), whatever ``trainer.max_steps`` is.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim.swa_utils import get_ema_multi_avg_fn


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The power-function EMA exponent gamma whose averaging profile has relative std ``sigma_rel``.

    EDM2 (Karras et al. 2024, Eq. 3): sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)), i.e. the
    largest real root of sigma^2 g^3 + 7 sigma^2 g^2 + (16 sigma^2 - 1) g + (12 sigma^2 - 1) = 0.
    """
    if not 0.0 < sigma_rel < 0.28:  # gamma = 0 (a plain running mean) already has sigma_rel 0.2887
        raise ValueError(f"EMA sigma_rel must be in (0, 0.28), got {sigma_rel!r}")
    s2 = sigma_rel**2
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def power_ema_multi_avg_fn(gamma: float) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    """``AveragedModel`` multi-tensor update with decay (1 - 1/t)^(gamma + 1) at the t-th averaged model.

    torch calls it with ``n_averaged`` = models averaged so far (>= 1; the first one was copied), so
    t = n_averaged + 1. One ``_foreach_lerp_`` per device and dtype, as torch's own EMA function.
    """

    def update(averaged: list[Tensor], current: list[Tensor], n_averaged: Tensor) -> None:
        t = int(n_averaged) + 1
        decay = (1.0 - 1.0 / t) ** (gamma + 1.0)
        if averaged[0].is_floating_point() or averaged[0].is_complex():
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        else:  # integer buffers (e.g. BatchNorm's step count): as torch's get_ema_multi_avg_fn does
            for a, c in zip(averaged, current, strict=True):
                a.copy_(a * decay + c * (1.0 - decay))

    return update


class EMA(WeightAveraging):
    """Exponential moving average of the weights (and buffers), updated with foreach kernels.

    Args:
        decay: the EMA decay (the average keeps ``decay`` of itself per update), in [0, 1). Ignored
            when ``sigma_rel`` is set.
        sigma_rel: use EDM2's power-function EMA instead, whose averaging window is this fraction
            of the run (relative std of the averaging profile; EDM2 finds 0.05-0.15 best). None: the
            constant ``decay``.
        update_every_n_steps: update the average every N optimizer steps.
        update_starting_at_step: first step to update at (None: from the start).
        update_starting_at_epoch: first epoch to update at (None: from the start).
        device: where the average lives (None: with the model).
        use_buffers: average the buffers too (as Lightning's EMAWeightAveraging does by default).
    """

    def __init__(
        self,
        decay: float = 0.999,
        sigma_rel: float | None = None,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        device: torch.device | str | int | None = None,
        use_buffers: bool = True,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay!r}")
        if sigma_rel is not None and not (isinstance(sigma_rel, (int, float)) and math.isfinite(sigma_rel)):
            raise ValueError(f"EMA sigma_rel must be a number in (0, 0.28) or null, got {sigma_rel!r}")
        update = get_ema_multi_avg_fn(decay) if sigma_rel is None else power_ema_multi_avg_fn(sigma_rel_to_gamma(sigma_rel))
        super().__init__(device=device, use_buffers=use_buffers, multi_avg_fn=update)
        self.sigma_rel, self.decay = sigma_rel, decay
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = update_starting_at_epoch

    # When to update: exactly Lightning's EMAWeightAveraging rule (same attributes).
    should_update = EMAWeightAveraging.should_update

    #: a constant-decay average that still holds more than this share of the initial weights at
    #: ``max_steps`` gets a warning at the start of fit
    INITIAL_SHARE_WARNING = 0.01

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Warn when a constant decay is too slow for the run: the final average would still hold
        ``decay ** max_steps`` of the initial, untrained weights."""
        super().on_fit_start(trainer, pl_module)
        steps = trainer.max_steps
        if self.sigma_rel is None and steps is not None and steps > 0:
            share = self.decay ** (steps / max(1, self.update_every_n_steps))
            if share > self.INITIAL_SHARE_WARNING:
                rank_zero_warn(
                    f"EMA decay {self.decay} over trainer.max_steps={steps}: the final average still holds "
                    f"{share:.0%} of the initial weights, and samples of such an average are far worse than the "
                    "training weights. Set the EMA's sigma_rel (e.g. 0.1: EDM2's power-function EMA, which "
                    "averages over a fixed fraction of any run) or a smaller decay."
                )
