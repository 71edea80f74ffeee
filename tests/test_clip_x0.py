"""``ClipX0``: the x0 estimate clipped to the data range, as diffusers' clip_sample and thresholding."""

from __future__ import annotations

import pytest
import torch

from bdiff.denoiser import Prediction
from bdiff.sampling import DDIM, DPMSolverPP2M, Sampler, SamplerCallback
from bdiff.sampler_callbacks.clip_x0 import ClipX0
from bdiff.sampling.noise import NoiseSource
from bdiff.sampling.recipe import load_recipe
from tests.test_steppers import SCHED, ToyDenoiser, _diffusers_loop


def _x_T() -> tuple[NoiseSource, torch.Tensor]:
    noise = NoiseSource(0, range(3))
    return noise, 2.0 * noise.draw((1, 4, 4))  # wide enough that many early x0 estimates leave [-1, 1]


@pytest.mark.parametrize("steps", [4, 10])  # step counts that divide T: diffusers' DDIM steps to t - T // steps
def test_ddim_with_clip_x0_matches_diffusers_clip_sample(steps: int) -> None:
    """With ``use_clipped_model_output``: diffusers' DDIM otherwise keeps the unclipped eps for the direction term."""
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(**SCHED, clip_sample=True, set_alpha_to_one=True, timestep_spacing="trailing")
    ref.set_timesteps(steps)
    noise, x_T = _x_T()
    ours = Sampler(ToyDenoiser(), DDIM(), steps, [ClipX0()]).run(x_T, noise).x
    expected = _diffusers_loop(ref, ToyDenoiser(), x_T.clone(), use_clipped_model_output=True)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    unclipped = Sampler(ToyDenoiser(), DDIM(), steps).run(x_T, noise).x
    assert (unclipped - ours).abs().max() > 1e-2  # the clip changed the samples


@pytest.mark.parametrize("steps", [5, 10])
def test_dpmpp_with_clip_x0_matches_diffusers_thresholding_at_one(steps: int) -> None:
    """diffusers' dynamic thresholding with ``sample_max_value=1`` clamps its percentile to 1: a clip at 1."""
    from diffusers import DPMSolverMultistepScheduler

    ref = DPMSolverMultistepScheduler(
        **SCHED, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
        final_sigmas_type="zero", timestep_spacing="trailing", thresholding=True, sample_max_value=1.0,
    )
    ref.set_timesteps(steps)
    noise, x_T = _x_T()
    ours = Sampler(ToyDenoiser(), DPMSolverPP2M(), steps, [ClipX0()]).run(x_T, noise).x
    torch.testing.assert_close(ours, _diffusers_loop(ref, ToyDenoiser(), x_T.clone()), rtol=1e-4, atol=1e-4)


class _Seen(SamplerCallback):
    """Keeps the x0 estimates and epistemic variances the callbacks after ClipX0 see."""

    def __init__(self) -> None:
        self.x0, self.var = [], []

    def after_prediction(self, state, sampler) -> None:
        self.x0.append(state.x0.clone())
        self.var.append(state.prediction.var_epistemic.clone())


class _VarianceDenoiser(ToyDenoiser):
    def predict(self, x: torch.Tensor, t: torch.Tensor) -> Prediction:
        return Prediction(self.eps(x, t), torch.full_like(x, 1e-3), torch.ones_like(x))


def test_clipped_pixels_are_in_range_and_lose_their_epistemic_variance() -> None:
    noise, x_T = _x_T()
    seen = _Seen()
    Sampler(_VarianceDenoiser(), DDIM(), 6, [ClipX0(0.5), seen]).run(x_T, noise)
    x0, var = torch.stack(seen.x0), torch.stack(seen.var)
    assert x0.abs().max() <= 0.5 + 1e-5
    at_limit = (x0.abs() - 0.5).abs() < 1e-5
    assert at_limit.any() and (~at_limit).any()
    assert (var[at_limit] == 0).all() and (var[~at_limit] == 1e-3).all()


class _EpsFinite(SamplerCallback):
    """Fails unless every noise prediction the callbacks after ClipX0 see is finite."""

    def after_prediction(self, state, sampler) -> None:
        assert torch.isfinite(state.prediction.eps).all(), "a finished sample (t = -1) got a non-finite eps"


class _FinishFirst(SamplerCallback):
    """At the second model call, sends sample 0 straight to the clean image (t_next = -1), as adaptive steps can."""

    def after_prediction(self, state, sampler) -> None:
        if state.step == 1:
            state.t_next[0] = -1


def test_finished_samples_keep_their_prediction() -> None:
    """A finished sample (t = -1, x0 = x beyond [-1, 1]) has no eps to recompute: clipping leaves its row alone."""
    noise, x_T = _x_T()
    result = Sampler(ToyDenoiser(), DDIM(), 6, [ClipX0(), _FinishFirst(), _EpsFinite()]).run(x_T, noise)
    assert result.nfe.tolist() == [2, 6, 6]


def test_clip_x0_is_a_recipe_callback_and_refuses_a_bad_limit() -> None:
    recipe = load_recipe({"stepper": "DDIM", "steps": 4, "callbacks": [{"class_path": "ClipX0", "init_args": {"limit": 1.0}}]})
    assert isinstance(recipe.callbacks[0], ClipX0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="clip_x0 limit"):
            ClipX0(bad)
