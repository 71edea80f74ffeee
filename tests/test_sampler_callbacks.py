"""Sampler callbacks: what each promises, on denoisers with known behaviour."""

from __future__ import annotations

import pytest
import torch

from bdiff.denoiser import Prediction
from bdiff.metrics.usefulness import filter_by_uncertainty, rank_by_uncertainty
from bdiff.sampling import DDIM, DPMSolverPP2M, Sampler
from bdiff.sampling import SamplerCallback
from bdiff.sampler_callbacks import (
    AdaptiveOutput, AdaptiveStepSize, BlendOutput, Recorder, RecorderOutput, UncertainRegionRefinement, VarianceWeightedBlending,
)
from bdiff.sampling.noise import NoiseSource
from bdiff.schedule import NoiseSchedule


class Toy:
    """eps_hat = x/2 with configurable epistemic/aleatoric variance maps; the mean's error is
    ``error_scale`` times the epistemic variance (as a fitted BayesianDenoiser states it)."""

    image_shape = (1, 4, 4)
    is_bayesian = True

    def __init__(self, var_ep: float | torch.Tensor = 0.0, var_al: float | torch.Tensor = 0.5,
                 error_scale: float = 1.0) -> None:
        self.schedule = NoiseSchedule("linear")
        self.var_ep, self.var_al, self.error_scale = var_ep, var_al, error_scale
        self.calls = 0

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> Prediction:
        self.calls += 1
        ones = torch.ones_like(x)
        return Prediction(0.5 * x, ones * self.var_ep, ones * self.var_al)

    def epistemic_error(self, pred: Prediction, t: torch.Tensor) -> torch.Tensor:
        return self.error_scale * pred.var_epistemic


def test_blending_is_the_base_sampler_where_the_mean_has_no_error_and_pulls_to_history_otherwise() -> None:
    plain = Sampler(Toy(10.0), DDIM(), 8).sample(4, seed=0)
    # A large epistemic (novelty) variance with no measured error of the mean: exactly the base sampler.
    accurate = Sampler(Toy(10.0, error_scale=0.0), DDIM(), 8, [VarianceWeightedBlending()]).sample(4, seed=0)
    torch.testing.assert_close(plain.images, accurate.images, rtol=0, atol=0)
    assert all(g == 1.0 for g in accurate.output(BlendOutput).gain)
    unsure = Sampler(Toy(10.0), DDIM(), 8, [VarianceWeightedBlending()]).sample(4, seed=0)
    assert min(unsure.output(BlendOutput).gain) < 0.8  # history gets weight where the mean errs
    assert not torch.allclose(unsure.images, plain.images)


def test_blending_without_a_stated_error_is_the_base_sampler() -> None:
    class NoErrorClaim(Toy):
        epistemic_error = None  # a denoiser that does not state its mean's error (deterministic nets, chains)

    plain = Sampler(NoErrorClaim(10.0), DDIM(), 6).sample(3, seed=2)
    blended = Sampler(NoErrorClaim(10.0), DDIM(), 6, [VarianceWeightedBlending()]).sample(3, seed=2)
    torch.testing.assert_close(plain.images, blended.images, rtol=0, atol=0)


def test_blend_strength_zero_disables_it() -> None:
    plain = Sampler(Toy(1.0), DDIM(), 6).sample(3, seed=1)
    off = Sampler(Toy(1.0), DDIM(), 6, [VarianceWeightedBlending(strength=0.0)]).sample(3, seed=1)
    torch.testing.assert_close(plain.images, off.images)


@pytest.mark.parametrize("callback", [AdaptiveStepSize(tol=0.05, max_extra_nfe=5),
                                      UncertainRegionRefinement(tol=0.05, jump=40, t_range=(0, 999), max_passes=2)],
                         ids=["adaptive", "refine"])
def test_adaptive_steps_and_refinement_are_the_base_sampler_where_the_mean_has_no_error(callback) -> None:
    """A large epistemic (novelty) and aleatoric variance, but no stated error of the mean: bit for bit the base
    sampler, with no extra call; the same for a denoiser that states no error at all."""
    plain = Sampler(Toy(10.0, 0.9), DDIM(), 8).sample(4, seed=0)
    accurate = Sampler(Toy(10.0, 0.9, error_scale=0.0), DDIM(), 8, [callback]).sample(4, seed=0)
    torch.testing.assert_close(plain.images, accurate.images, rtol=0, atol=0)
    assert torch.equal(plain.nfe, accurate.nfe)

    class NoErrorClaim(Toy):
        epistemic_error = None

    silent = Sampler(NoErrorClaim(10.0, 0.9), DDIM(), 8, [callback]).sample(4, seed=0)
    torch.testing.assert_close(plain.images, silent.images, rtol=0, atol=0)


@pytest.mark.parametrize("extra", [0, 1, 3])
def test_adaptive_steps_stay_within_their_extra_calls(extra: int) -> None:
    r = Sampler(Toy(1.0), DPMSolverPP2M(), 6, [AdaptiveStepSize(tol=0.01, max_extra_nfe=extra)]).sample(5, seed=0)
    assert (r.nfe == 6 + extra).all()  # an error this large wants every split it may take
    assert (r.output(AdaptiveOutput).splits == extra).all()


def test_adaptive_splits_more_steps_where_the_mean_errs_more() -> None:
    def calls(error_scale: float) -> float:
        den = Toy(0.05, 0.5, error_scale=error_scale)
        return Sampler(den, DDIM(), 6, [AdaptiveStepSize(tol=0.3, max_extra_nfe=50)]).sample(2, seed=0).nfe.float().mean()

    assert calls(0.0) == 6 < calls(0.2) < calls(5.0)


def test_refinement_touches_only_pixels_whose_mean_errs_and_counts_nfe() -> None:
    var_ep = torch.full((1, 1, 4, 4), 0.0)
    var_ep[..., :2, :2] = 0.9  # an erring corner, an accurate rest (whatever the aleatoric spread)
    cb = UncertainRegionRefinement(tol=0.05, jump=40, t_range=(0, 999), max_passes=2)
    plain = Sampler(Toy(var_ep, 0.9), DDIM(), 6).sample(3, seed=0)
    refined = Sampler(Toy(var_ep, 0.9), DDIM(), 6, [cb]).sample(3, seed=0)
    changed = (plain.images - refined.images).abs().amax(0).squeeze() > 1e-6
    assert changed[:2, :2].any() and not changed[2:, :].any() and not changed[:, 2:].any()
    assert (refined.nfe == plain.nfe + 2).all()  # max_passes extra calls, each counted


def test_recorder_memory_is_bounded() -> None:
    r = Sampler(Toy(0.1), DDIM(), 20, [Recorder(keys=("x0", "var"), every=2, max_records=3, max_samples=2)]).sample(5)
    records = r.output(RecorderOutput).records
    assert len(records) == 3 and records[0]["x0"].shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="unknown"):
        Recorder(keys=("gradients",))


def test_rank_and_filter_by_uncertainty() -> None:
    var = torch.stack([torch.full((1, 2, 2), v) for v in (0.3, 0.1, 0.2, 0.4)])
    assert rank_by_uncertainty(var).tolist() == [1, 2, 0, 3]
    assert sorted(filter_by_uncertainty(var, keep=0.5).tolist()) == [1, 2]
    with pytest.raises(ValueError, match="keep"):
        filter_by_uncertainty(var, keep=0.0)


def test_sampler_loop_is_bounded() -> None:
    class Stuck(SamplerCallback):
        def after_update(self, state, sampler):
            sampler.restart(state, state.active.nonzero().squeeze(1), 999)  # send every sample back, forever

    with pytest.raises(RuntimeError, match="max_iterations"):
        Sampler(Toy(), DDIM(), 3, [Stuck()], max_iterations=10).run(torch.zeros(1, 1, 4, 4), NoiseSource(0, [0]))
