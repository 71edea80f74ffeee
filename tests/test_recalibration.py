"""Per-t recalibration of the aleatoric variance (bdiff.bayes.recalibration) and its trip through training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bdiff.bayes.recalibration import (
    KnotErrors,
    VarianceCalibration,
    default_knots,
    fit_calibration,
    knot_errors,
    solve_log_scale,
)
from bdiff.checkpoint import load_model, read_checkpoint
from bdiff.datasets import digits_split
from bdiff.denoiser import Prediction
from bdiff.metrics.calibration import calibration_at_t


def test_knots_start_at_zero_end_at_T_minus_1_and_are_dense_at_small_t() -> None:
    knots = default_knots(1000, 32)
    assert knots[0] == 0 and knots[-1] == 999 and knots == sorted(set(knots))
    assert sum(k <= 50 for k in knots) >= 6  # the error changes fastest at small t


def test_scale_interpolates_log_linearly_and_is_flat_beyond_the_ends() -> None:
    cal = VarianceCalibration((0, 100, 300), (0.0, math.log(4.0), math.log(0.25)))
    s = cal.scale(torch.tensor([0, 50, 100, 200, 300, 999]))
    torch.testing.assert_close(s, torch.tensor([1.0, 2.0, 4.0, 1.0, 0.25, 0.25]))


def test_apply_scales_only_the_aleatoric_variance_unless_told_otherwise() -> None:
    cal = VarianceCalibration((0, 999), (math.log(3.0), math.log(3.0)))
    pred = Prediction(torch.randn(2, 1, 4, 4), torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4))
    out = cal.apply(pred, torch.tensor([5, 700]))
    assert out.eps is pred.eps and out.var_epistemic is pred.var_epistemic
    torch.testing.assert_close(out.var_aleatoric, 3 * pred.var_aleatoric)


def test_bad_calibrations_are_refused() -> None:
    with pytest.raises(ValueError, match="increase"):
        VarianceCalibration((0, 0), (0.0, 0.0))
    with pytest.raises(ValueError, match=">= 2 knots"):
        VarianceCalibration((0,), (0.0,))


@pytest.mark.parametrize("true_scale", [0.2, 3.0])
def test_solved_scale_recovers_a_misscaled_variance_by_monte_carlo(true_scale: float) -> None:
    """err ~ N(0, s* var_a + var_e) with var_a reported: the fit finds s* (and z^2 = 1 after it)."""
    g = torch.Generator().manual_seed(0)
    var_a = torch.rand(200_000, generator=g) + 0.1
    var_e = 0.05 * torch.rand(200_000, generator=g)
    err2 = (torch.randn(200_000, generator=g) * (true_scale * var_a + var_e).sqrt()) ** 2
    log_s = solve_log_scale(KnotErrors(err2, var_a, var_e))
    assert math.exp(log_s) == pytest.approx(true_scale, rel=0.03)
    z2 = (err2 / (math.exp(log_s) * var_a + var_e)).mean()
    assert float(z2) == pytest.approx(1.0, abs=1e-6)


def test_without_epistemic_variance_the_scale_is_the_mean_ratio() -> None:
    err2, var_a = torch.rand(1000) * 2, torch.rand(1000) + 0.5
    log_s = solve_log_scale(KnotErrors(err2, var_a, torch.zeros(1000)))
    assert math.exp(log_s) == pytest.approx(float((err2 / var_a).double().mean()), rel=1e-6)


def test_where_the_epistemic_variance_alone_exceeds_the_error_both_take_one_scale() -> None:
    """Knot 1: var_e alone is 3x the error's variance, so no aleatoric scale calibrates the total; both
    variances get one common scale that does (z^2 = 1), and their ratio is kept. Knot 0 is left as before."""
    g = torch.Generator().manual_seed(0)
    n = 100_000
    var_a, var_e = torch.rand(n, generator=g) + 0.5, torch.rand(n, generator=g) + 0.5
    fine = KnotErrors((torch.randn(n, generator=g) * (2 * var_a + var_e).sqrt()) ** 2, var_a, var_e)
    over = KnotErrors((torch.randn(n, generator=g) * (var_e / 3).sqrt()) ** 2, var_a, var_e)
    cal = fit_calibration([0, 999], [fine, over])
    assert cal.log_epistemic_scale is not None and cal.log_epistemic_scale[0] == 0.0
    assert cal.log_scale[1] == cal.log_epistemic_scale[1] < 0
    for t, e in ((0, fine), (999, over)):
        out = cal.apply(Prediction(torch.zeros(n), e.var_epistemic, e.var_aleatoric), torch.full((n,), t))
        assert float((e.err2 / (out.var_aleatoric + out.var_epistemic)).double().mean()) == pytest.approx(1.0, abs=1e-5)
    assert VarianceCalibration.from_dict(cal.to_dict()) == cal
    assert fit_calibration([0, 999], [fine, fine]).log_epistemic_scale is None  # nothing over-explained: as before
    old = VarianceCalibration.from_dict({"knots": [0, 999], "log_scale": [0.0, 1.0]})  # a checkpoint of earlier versions
    assert old.log_epistemic_scale is None and "log_epistemic_scale" not in old.to_dict()
    with pytest.raises(ValueError, match="one log_epistemic_scale per knot"):
        VarianceCalibration((0, 999), (0.0, 0.0), (0.0,))


def test_training_stores_a_calibration_that_load_model_restores(trained, last_ckpt: Path) -> None:
    ckpt = read_checkpoint(last_ckpt)
    assert "variance_calibration" in ckpt
    loaded = load_model(last_ckpt)
    assert loaded.calibration == VarianceCalibration.from_dict(ckpt["variance_calibration"])
    assert list(loaded.calibration.knots) == default_knots(1000)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([3, 40, 400, 900])
    with torch.no_grad():
        cal, raw = loaded.predict(x, t), loaded.predict_uncalibrated(x, t)
    torch.testing.assert_close(cal.var_aleatoric, raw.var_aleatoric * loaded.calibration.scale(t).view(-1, 1, 1, 1))
    chains = loaded.posterior_chains(2, torch.Generator().manual_seed(0))
    assert chains.calibration == loaded.calibration


def test_fitted_calibration_makes_held_out_z2_one_at_the_knots(last_ckpt: Path) -> None:
    """Fit on held-out digits; the same errors (same noise) then give z^2 = 1 at every knot."""
    den = load_model(last_ckpt)
    x0 = digits_split("val")[:40] * 2 - 1
    knots = [10, 250, 750]
    den.calibration = fit_calibration(knots, knot_errors(den.predict_uncalibrated, den.schedule, x0, knots,
                                                        torch.Generator().manual_seed(5)))
    # calibration_at_t draws its noise the same way (one (N,C,H,W) draw per t, in order)
    rows = calibration_at_t(den, x0, knots, torch.Generator().manual_seed(5))
    for r in rows:
        assert r["z2_total"] == pytest.approx(1.0, abs=1e-3), r


def test_calibration_can_be_switched_off_and_bad_knot_counts_are_refused() -> None:
    from bdiff.lit.module import DiffusionModule

    assert DiffusionModule(variance_calibration_knots=0).calibration_knots == []
    with pytest.raises(ValueError, match="variance_calibration_knots"):
        DiffusionModule(variance_calibration_knots=1)


def test_checkpoints_without_a_calibration_load_uncalibrated(last_ckpt: Path, tmp_path: Path) -> None:
    ckpt = torch.load(last_ckpt, weights_only=True)
    del ckpt["variance_calibration"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    den = load_model(tmp_path / "old.ckpt")
    assert den.calibration is None
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 500])
    torch.testing.assert_close(den.predict(x, t).var_aleatoric, den.predict_uncalibrated(x, t).var_aleatoric)
