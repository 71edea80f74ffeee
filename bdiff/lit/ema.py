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
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMA(WeightAveraging):
    """Exponential moving average of the weights (and buffers), updated with foreach kernels.

    Args:
        decay: the EMA decay (the average keeps ``decay`` of itself per update), in [0, 1).
        update_every_n_steps: update the average every N optimizer steps.
        update_starting_at_step: first step to update at (None: from the start).
        update_starting_at_epoch: first epoch to update at (None: from the start).
        device: where the average lives (None: with the model).
        use_buffers: average the buffers too (as Lightning's EMAWeightAveraging does by default).
    """

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        device: torch.device | str | int | None = None,
        use_buffers: bool = True,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay!r}")
        super().__init__(device=device, use_buffers=use_buffers, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = update_starting_at_epoch

    # When to update: exactly Lightning's EMAWeightAveraging rule (same attributes).
    should_update = EMAWeightAveraging.should_update
