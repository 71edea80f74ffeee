"""The state a sampler callback sees and may change."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from bdiff.denoiser import Prediction


@dataclass
class SamplerState:
    """Everything about a batch mid-sampling. Image tensors are (B,C,H,W), per-sample ones (B,).

    Attributes:
        x: current x_t.
        t: current integer timestep per sample; -1 once a sample is finished.
        t_next: the timestep each sample steps to next (-1 = the clean image). Callbacks
            may change it after the prediction (step-size control).
        active: samples taking a step this iteration (t >= 0).
        step: iteration counter (0-based).
        prediction: the denoiser's Prediction at (x, t) (rows of inactive samples are zero).
        x0: x0 estimate used by the update (callbacks may replace it, e.g. blending).
        x0_var: epistemic variance of ``x0`` (same scale as x).
        x_next: the proposed x at t_next, set by the update; callbacks may change it.
        accept: per-sample mask; a callback may reject a proposed step (the sample stays at
            (x, t) and tries again with the t_next the callback sets).
        amp: signed amplitude of the propagated posterior perturbation of x_t; ``var = amp**2``.
        var: propagated posterior variance of x_t.
        nfe: sequential denoiser calls per sample so far (extra passes included).
        rejected: rejected steps per sample.
        flags: samples flagged by a callback for another pass.
        restarts: how often each sample was sent back to a noisier t for another pass. A
            callback that restarts a sample (sets a larger ``t_next`` after the update) adds 1;
            the sampler then clears the stepper's multistep memory for it, and callbacks with
            per-sample memory (blending) start afresh.
        history: earlier steps' {"t", "x0", "x0_var"} (bounded by the sampler's ``history``).
        extras: free space for callbacks (keyed by callback name).
        memory: the stepper's multistep memory (previous x0, its amplitude, a_prev).
    """

    x: Tensor
    t: Tensor
    t_next: Tensor
    active: Tensor
    amp: Tensor
    nfe: Tensor
    rejected: Tensor
    flags: Tensor
    restarts: Tensor | None = None
    step: int = 0
    prediction: Prediction | None = None
    x0: Tensor | None = None
    x0_var: Tensor | None = None
    x_next: Tensor | None = None
    accept: Tensor | None = None
    history: list[dict[str, Tensor]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Tensor] = field(default_factory=dict)

    @property
    def var(self) -> Tensor:
        return self.amp**2

    @property
    def finished(self) -> bool:
        return bool((self.t < 0).all())
