"""The epistemic variance in the units of the mean's error: the fit, its storage and the refit command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bdiff.bayes.error_scale import EpistemicErrorScale, fit_error_scale
from bdiff.checkpoint import load_model, read_checkpoint
from bdiff.denoiser import Prediction
from bdiff.recalibrate import fit_for_checkpoint, main as recalibrate
from bdiff.schedule import NoiseSchedule


class MemorisingPredictor:
    """eps_hat = eps + an error of variance ``err_var`` on images it was not trained on, none on its training images.

    Training images are marked by a constant pixel value of +1 in the corner (x0[..., 0, 0] = 1); the
    epistemic variance it reports is ``var_ep`` everywhere.
    """

    def __init__(self, schedule: NoiseSchedule, err_var: float, var_ep: float = 0.5, base_var: float = 0.0) -> None:
        self.schedule, self.err_var, self.var_ep, self.base_var = schedule, err_var, var_ep, base_var
        self.x0: torch.Tensor | None = None
        self.noise: torch.Tensor | None = None
        self.gen = torch.Generator().manual_seed(7)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        seen = (self.x0[:, :, :1, :1] == 1).to(x_t.dtype)  # x0 and the true noise: recorded by _fit's q_sample
        error = (self.base_var + (1 - seen) * self.err_var) ** 0.5 * torch.randn(x_t.shape, generator=self.gen)
        eps_hat = self.noise + error
        return Prediction(eps_hat, torch.full_like(x_t, self.var_ep), torch.ones_like(x_t))


def _fit(err_var: float, monkeypatch: pytest.MonkeyPatch, n: int = 64, base_var: float = 0.0) -> EpistemicErrorScale:
    schedule = NoiseSchedule("linear")
    train = torch.rand(n, 1, 4, 4) * 0.5
    train[:, :, 0, 0] = 1.0
    val = torch.rand(n, 1, 4, 4) * 0.5
    predictor = MemorisingPredictor(schedule, err_var, base_var=base_var)
    real_q_sample = schedule.q_sample

    def q_sample(x0, t, noise, *args):  # remember which images and noise the predictor is about to see
        predictor.x0, predictor.noise = x0, noise
        return real_q_sample(x0, t, noise, *args)

    monkeypatch.setattr(schedule, "q_sample", q_sample)
    return fit_error_scale(predictor, schedule, train, val, [0, 500, 999], torch.Generator().manual_seed(0))


def test_the_scale_is_the_measured_excess_error_per_unit_of_epistemic_variance(monkeypatch: pytest.MonkeyPatch) -> None:
    scale = _fit(0.2, monkeypatch, n=256)
    assert scale.excess == pytest.approx((0.2,) * 3, rel=0.15)  # Monte Carlo: 256 images x 16 pixels
    for r, excess, se in zip(scale.scale, scale.excess, scale.standard_error):
        assert r == pytest.approx((excess - 2 * se) / 0.5)  # the part two standard errors above zero, over var_ep


def test_an_excess_error_within_two_standard_errors_counts_as_none(monkeypatch: pytest.MonkeyPatch) -> None:
    scale = _fit(0.004, monkeypatch, n=16, base_var=1.0)  # a tiny excess beside unit irreducible noise, 16 images
    assert all(e < 2 * se for e, se in zip(scale.excess, scale.standard_error))
    assert scale.scale == (0.0, 0.0, 0.0)


def test_a_model_as_accurate_on_unseen_images_as_on_its_own_gets_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    scale = _fit(0.0, monkeypatch)
    assert scale.scale == (0.0, 0.0, 0.0)
    assert scale.excess == (0.0, 0.0, 0.0)


def test_scale_interpolates_linearly_is_flat_beyond_the_ends_and_round_trips() -> None:
    scale = EpistemicErrorScale((10, 20), (0.0, 1.0), (0.1, 0.2), (0.01, 0.01))
    torch.testing.assert_close(scale(torch.tensor([0, 10, 15, 20, 999])), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    assert EpistemicErrorScale.from_dict(scale.to_dict()) == scale
    with pytest.raises(ValueError, match=">= 0"):
        EpistemicErrorScale((10, 20), (0.0, -1.0))
    with pytest.raises(ValueError, match="increase"):
        EpistemicErrorScale((20, 10), (0.0, 1.0))
    with pytest.raises(ValueError, match=">= 2 training"):
        fit_error_scale(lambda x, t: None, NoiseSchedule("linear"), torch.zeros(1, 1, 2, 2), torch.zeros(4, 1, 2, 2),
                        [0, 1], torch.Generator())


def test_training_stores_the_scale_and_load_model_applies_it(last_ckpt: Path) -> None:
    ckpt = read_checkpoint(last_ckpt)
    assert "epistemic_error_scale" in ckpt
    denoiser = load_model(last_ckpt)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 100, 900])
    pred = denoiser.predict(x, t)
    error = denoiser.epistemic_error(pred, t)
    expected = pred.var_epistemic * denoiser.error_scale(t).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(error, expected)


def test_training_fits_the_scale_on_the_weights_the_checkpoint_holds(last_ckpt: Path) -> None:
    """The EMA's averaged weights (swapped out again by the time the module's epoch-end hook runs), not the
    optimiser's: a refit on the checkpoint reproduces the stored r(t) and its measured excess error."""
    stored = EpistemicErrorScale.from_dict(read_checkpoint(last_ckpt)["epistemic_error_scale"])
    refit = fit_for_checkpoint(last_ckpt)
    assert stored.knots == refit.knots
    np.testing.assert_allclose(stored.excess, refit.excess, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(stored.scale, refit.scale, rtol=1e-4, atol=1e-7)


def test_a_checkpoint_without_the_scale_says_how_to_add_it_and_recalibrate_adds_it(last_ckpt: Path, tmp_path: Path) -> None:
    old = tmp_path / "old.ckpt"
    ckpt = read_checkpoint(last_ckpt)
    del ckpt["epistemic_error_scale"]
    torch.save(ckpt, old)
    denoiser = load_model(old)
    pred = denoiser.predict(torch.randn(2, 1, 8, 8), torch.tensor([10, 20]))
    with pytest.raises(ValueError, match="python -m bdiff.recalibrate --ckpt"):
        denoiser.epistemic_error(pred, torch.tensor([10, 20]))
    recalibrate(["--ckpt", str(old)])
    refit = load_model(old)
    assert refit.error_scale is not None and len(refit.error_scale.knots) == 16
    refitted = read_checkpoint(old)
    assert set(refitted) == set(ckpt) | {"epistemic_error_scale"}  # nothing else lost
    assert refitted["state_dict"].keys() == ckpt["state_dict"].keys()
