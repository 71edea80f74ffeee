"""The state a sampler callback sees and may change."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from bdiff.denoiser import Prediction
from bdiff.sampling.noise import NoiseSource


@dataclass
class SamplerState:
    """Everything about a batch mid-sampling. Image tensors are (B,C,H,W), per-sample ones (B,).

    Attributes:
        x: current x_t.
        t: current integer timestep per sample; -1 once a sample is finished.
        t_next: the timestep each sample steps to next (-1 = the clean image). Callbacks
            may change it after the prediction (step-size control).
        active: samples taking a step this iteration (t >= 0).
        amp: signed amplitude of the propagated posterior perturbation of x_t; ``var = amp**2``.
        nfe: sequential denoiser calls per sample so far (extra passes included).
        rejected: rejected steps per sample.
        flags: samples flagged by a callback for another pass.
        restarts: how often :meth:`Sampler.restart` sent each sample back to a noisier t.
        restarted: samples sent back during this iteration (their stepper memory is cleared
            when the step is committed).
        noise: the per-sample random streams (:meth:`draw`), for the stepper and callbacks alike.
        step: iteration counter (0-based).
        prediction: the denoiser's Prediction at (x, t) (rows of inactive samples are zero).
        x0: x0 estimate used by the update (callbacks may replace it, e.g. blending).
        x0_var: epistemic variance of ``x0`` (same scale as x).
        x_next, amp_next: the proposed x at t_next and its amplitude, set by the update;
            callbacks may change them.
        accept: per-sample mask; a callback may reject a proposed step (the sample stays at
            (x, t) and tries again with the t_next the callback sets).
        extras: free space for callbacks (keyed by callback name).
    """

    x: Tensor
    t: Tensor
    t_next: Tensor
    active: Tensor
    amp: Tensor
    nfe: Tensor
    rejected: Tensor
    flags: Tensor
    restarts: Tensor
    restarted: Tensor
    noise: NoiseSource
    step: int = 0
    prediction: Prediction | None = None
    x0: Tensor | None = None
    x0_var: Tensor | None = None
    x_next: Tensor | None = None
    amp_next: Tensor | None = None
    accept: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def var(self) -> Tensor:
        return self.amp**2

    @property
    def finished(self) -> bool:
        return bool((self.t < 0).all())

    def draw(self, rows: Tensor) -> Tensor:
        """Standard normal draws (K,C,H,W) from the streams of samples ``rows`` (K,), in x's dtype and device."""
        if rows.numel() == 0:
            return self.x.new_zeros((0, *self.x.shape[1:]))
        return self.noise.draw(tuple(self.x.shape[1:]), rows, self.x.device).to(self.x.dtype)
