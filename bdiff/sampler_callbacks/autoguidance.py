"""Autoguidance: guide the model with a worse version of itself (Karras et al., NeurIPS 2024).

"Guiding a Diffusion Model with a Bad Version of Itself" (Karras, Aittala, Kynkaanniemi,
Lehtinen, Aila, Laine) extrapolates from a weaker denoiser D_0 (smaller and/or trained for
less long on the same data) past the main one D_1: D = D_0 + g (D_1 - D_0), g > 1. The two
make the same kinds of error, the weak one more of them, so the difference points away from
where both are wrong: it sharpens the distribution the ODE samples without the loss of variety
classifier-free guidance brings, and needs no classes. In noise-prediction form, with
``weight`` w = g - 1,

    eps' = eps_1 + w (eps_1 - eps_0),

and the x0 estimate the stepper uses follows. The epistemic variance is the main model's,
scaled by (1 + w)^2 (the guide is a fixed network); the guide's aleatoric head is not used.

Every guide call is a denoiser call and lands in ``nfe``: a guided step costs two. Guidance
can be limited to ``t_range`` (Kynkaanniemi et al., 2024, "Applying Guidance in a Limited
Interval Improves Sample and Distribution Quality"), where the other steps cost one.

Written here because no library offers it as a hook: diffusers' schedulers take the model
output as given, and its pipelines guide only with classes or text.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bdiff.checks import as_number
from bdiff.denoiser import Denoiser
from bdiff.sampling.sampler import Sampler, SamplerCallback
from bdiff.sampling.state import SamplerState


class Autoguidance(SamplerCallback):
    """eps' = eps + ``weight`` (eps - eps_guide) at t in ``t_range`` (module docstring).

    Args:
        guide: the weaker model: a checkpoint path written by ``train.py`` (read on first use; its
            posterior-mean noise prediction guides) or a :class:`~bdiff.denoiser.Denoiser`. It must share the main
            model's image shape and noise schedule.
        weight: w = g - 1 >= 0 (0 changes nothing but still spends the guide's calls).
        t_range: [lo, hi] timesteps where the guide is called; elsewhere the step costs one call.
    """

    name = "autoguidance"

    def __init__(self, guide: str | Path | Denoiser, weight: float = 0.5, t_range: tuple[int, int] = (0, 999)) -> None:
        if not isinstance(guide, (str, Path, Denoiser)):
            raise ValueError(f"autoguidance guide must be a checkpoint path or a Denoiser, got {type(guide).__name__}")
        if isinstance(guide, (str, Path)) and not Path(guide).is_file():
            raise ValueError(f"autoguidance guide checkpoint {str(guide)!r} does not exist; train one with train.py "
                             "(a smaller, shorter run on the same data, e.g. configs/digits_guide.yaml)")
        if len(t_range) != 2 or not 0 <= t_range[0] <= t_range[1]:
            raise ValueError(f"autoguidance t_range must be [lo, hi] with 0 <= lo <= hi, got {list(t_range)}")
        self.weight = as_number("autoguidance weight", weight, 0)
        self.t_range = (int(t_range[0]), int(t_range[1]))
        self._source = guide
        self._guide: Denoiser | None = None if isinstance(guide, (str, Path)) else guide

    @property
    def guide(self) -> Denoiser:
        """The guide model, read from its checkpoint on first use (so a recipe parses without loading it)."""
        if self._guide is None:
            from bdiff.checkpoint import load_model

            self._guide = load_model(self._source)  # type: ignore[arg-type]
        return self._guide

    def check(self, denoiser: Denoiser) -> None:
        super().check(denoiser)
        guide = self.guide
        if tuple(guide.image_shape) != tuple(denoiser.image_shape):
            raise ValueError(f"autoguidance: the guide makes images of shape {tuple(guide.image_shape)}, "
                             f"the model {tuple(denoiser.image_shape)}; train the guide on the same data")
        ours, theirs = denoiser.schedule.alphas_cumprod, guide.schedule.alphas_cumprod
        if ours.shape != theirs.shape or not torch.allclose(ours.double().cpu(), theirs.double().cpu(), atol=1e-6):
            raise ValueError("autoguidance: the guide's noise schedule differs from the model's; "
                             "train the guide with the same model.schedule")
        if self.t_range[1] >= len(ours):
            raise ValueError(f"autoguidance t_range={list(self.t_range)} must lie below the schedule's {len(ours)} steps")

    def on_start(self, state: SamplerState, sampler: Sampler) -> None:
        to = getattr(self.guide, "to", None)
        if callable(to):
            to(state.x.device)

    def after_prediction(self, state: SamplerState, sampler: Sampler) -> None:
        lo, hi = self.t_range
        guided = state.active & (state.t >= lo) & (state.t <= hi)
        rows = guided.nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        eps_guide = self.guide.predict(state.x[rows], state.t[rows]).eps.to(state.x.dtype)
        state.nfe[rows] += 1
        pred, w = state.prediction, self.weight
        eps, var = pred.eps.clone(), pred.var_epistemic.clone()
        eps[rows] = eps[rows] + w * (eps[rows] - eps_guide)
        var[rows] = var[rows] * (1 + w) ** 2  # eps' = (1 + w) eps - w eps_guide, eps_guide fixed
        sampler.replace_prediction(state, eps, var, guided)  # place autoguidance first among the callbacks
