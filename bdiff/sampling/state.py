"""The state a sampler callback sees and may change, and what a sampling run returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import Tensor

from bdiff.denoiser import Prediction
from bdiff.sampling.noise import NoiseSource

T = TypeVar("T")


@dataclass
class SamplerState:
    """A batch mid-sampling. Image tensors are (B,C,H,W), per-sample ones (B,).

    Attributes:
        x, amp: current x_t and the signed amplitude of its propagated posterior perturbation (``var = amp**2``).
        t: current integer timestep per sample; -1 once a sample is finished.
        t_next: the timestep each sample steps to next (-1 = the clean image).
        active: samples taking a step this iteration (t >= 0).
        nfe: sequential denoiser calls per sample so far (extra passes included).
        flags: samples flagged by a callback for another pass.
        restarts: how often :meth:`Sampler.restart` sent each sample back; ``restarted``: during this iteration.
        noise: the per-sample random streams (:meth:`draw`).
        step: iteration counter (0-based).
        prediction: the denoiser's Prediction at (x, t) (zero rows for finished samples).
        x0: the x0 estimate the step uses (change it through :meth:`Sampler.replace_prediction`).
        x_next, amp_next: the step's result at t_next (change them through :meth:`Sampler.replace_x_next`).
        edited: pixels of ``x_next`` a callback replaced this iteration (a corrector leaves them alone).
        outputs: each callback's own typed output, by callback (:meth:`SampleResult.output`).
    """

    x: Tensor
    amp: Tensor
    t: Tensor
    t_next: Tensor
    active: Tensor
    nfe: Tensor
    flags: Tensor
    restarts: Tensor
    restarted: Tensor
    noise: NoiseSource
    step: int = 0
    prediction: Prediction | None = None
    x0: Tensor | None = None
    x_next: Tensor | None = None
    amp_next: Tensor | None = None
    edited: Tensor | None = None
    outputs: dict[Any, Any] = field(default_factory=dict)

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


@dataclass
class SampleResult:
    """Finished images and what it took. images/variance (N,C,H,W) in [-1,1] scale; nfe, flags (N,).

    ``outputs`` holds each sampler callback's typed output (e.g. a :class:`~bdiff.sampler_callbacks.critic.CriticOutput`);
    :meth:`output` finds one by type.
    """

    images: Tensor
    variance: Tensor
    nfe: Tensor
    flags: Tensor
    seconds: float
    outputs: dict[Any, Any] = field(default_factory=dict)

    def output(self, kind: type[T]) -> T | None:
        """The output of the first callback whose output is a ``kind``, or None."""
        return next((out for out in self.outputs.values() if isinstance(out, kind)), None)
