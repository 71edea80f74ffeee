"""Calibration of predicted variances, against a synthetic denoiser whose true error variance is known."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from bdiff.denoiser import Denoiser, Prediction
from bdiff.metrics.calibration import (
    calibration_at_t,
    plot_reliability,
    reliability_at_t,
    reliability_curve,
)
from bdiff.schedule import NoiseSchedule

TIMESTEPS = [10, 500, 990]


class KnownErrorDenoiser:
    """Knows x0, so recovers the true noise from x_t and adds an error of per-pixel variance ``v``.

    Predicts ``var_epistemic = epistemic * v`` and ``var_aleatoric = aleatoric * v``: the total is
    calibrated when ``epistemic + aleatoric == 1``.
    """

    def __init__(self, x0: Tensor, v: Tensor, epistemic: float, aleatoric: float, seed: int = 1) -> None:
        self.schedule = NoiseSchedule()
        self.image_shape = tuple(x0.shape[1:])
        self.x0, self.v = x0, v
        self.epistemic, self.aleatoric = epistemic, aleatoric
        self.generator = torch.Generator().manual_seed(seed)

    def predict(self, x_t: Tensor, t: Tensor) -> Prediction:
        noise = self.schedule.x0_to_eps(x_t, t, self.x0.expand_as(x_t))
        v = self.v.expand_as(x_t)
        eps = noise + v.sqrt() * torch.randn(x_t.shape, generator=self.generator)
        return Prediction(eps, self.epistemic * v, self.aleatoric * v)


def _setup(n: int = 256) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 1, 8, 8, generator=g) * 2 - 1  # one fixed image pattern, repeated
    v = 10 ** (torch.rand(1, 1, 8, 8, generator=g) * 2 - 2)  # per-pixel error variance in [0.01, 1]
    return x0.expand(n, -1, -1, -1).contiguous(), v


def test_synthetic_denoiser_is_a_denoiser() -> None:
    x0, v = _setup()
    assert isinstance(KnownErrorDenoiser(x0[:1], v, 0.25, 0.75), Denoiser)


def test_calibrated_variance_gives_z2_one() -> None:
    x0, v = _setup()
    rows = calibration_at_t(KnownErrorDenoiser(x0[:1], v, 0.25, 0.75), x0, TIMESTEPS, torch.Generator().manual_seed(0))
    assert [r["t"] for r in rows] == TIMESTEPS
    for r in rows:
        assert r["num_pixels"] == x0.numel()
        assert r["z2_total"] == pytest.approx(1.0, abs=0.05)
        assert r["z2_aleatoric"] == pytest.approx(4 / 3, rel=0.05)  # 0.75 v predicted for an error of v
        assert r["z2_epistemic"] == pytest.approx(4.0, rel=0.05)
        assert r["mse"] == pytest.approx(float(v.mean()), rel=0.05)
        assert r["mean_var_total"] == pytest.approx(float(v.mean()), rel=1e-5)
        expected_nll = 0.5 * (math.log(2 * math.pi) + float(v.log().mean()) + 1.0)
        assert r["nll_total"] == pytest.approx(expected_nll, abs=0.03)


def test_variance_four_times_too_small_gives_z2_four() -> None:
    x0, v = _setup()
    rows = calibration_at_t(KnownErrorDenoiser(x0[:1], v, 0.0625, 0.1875), x0, TIMESTEPS)
    for r in rows:
        assert r["z2_total"] == pytest.approx(4.0, rel=0.05)
        assert r["mean_var_total"] == pytest.approx(r["mse"] / 4, rel=0.05)


def test_deterministic_model_reports_none_not_inf() -> None:
    x0, v = _setup(32)
    rows = calibration_at_t(KnownErrorDenoiser(x0[:1], v, 0.0, 1.0), x0, TIMESTEPS)
    for r in rows:
        assert r["z2_epistemic"] is None and r["nll_epistemic"] is None
        assert r["mean_var_epistemic"] == 0.0
        assert r["z2_total"] == pytest.approx(1.0, abs=0.15)
        assert all(value is None or math.isfinite(value) for value in r.values())


def test_numbers_are_reproducible() -> None:
    x0, v = _setup(32)
    a = calibration_at_t(KnownErrorDenoiser(x0[:1], v, 0.5, 0.5), x0, TIMESTEPS)
    b = calibration_at_t(KnownErrorDenoiser(x0[:1], v, 0.5, 0.5), x0, TIMESTEPS)
    assert a == b


def test_reliability_curve_of_calibrated_variance_is_the_diagonal() -> None:
    x0, v = _setup()
    curves = reliability_at_t(KnownErrorDenoiser(x0[:1], v, 0.25, 0.75), x0, 500, bins=15)
    pred_var, observed, counts = curves["total"]
    assert pred_var.shape == observed.shape == counts.shape == (15,)
    assert int(counts.sum()) == x0.numel() and int(counts.min()) >= x0.numel() // 15
    assert bool((pred_var[1:] >= pred_var[:-1]).all())  # bins in increasing predicted variance
    assert pred_var[-1] / pred_var[0] > 20  # the bins span the range of v
    ratio = observed / pred_var
    assert bool(((ratio > 0.8) & (ratio < 1.25)).all()), ratio
    over = (observed / curves["aleatoric"][0]).mean()  # aleatoric alone is 0.75 v: 4/3 above the diagonal
    assert float(over) == pytest.approx(4 / 3, rel=0.1)


def test_reliability_curve_exact_small_case() -> None:
    var = torch.tensor([4.0, 1.0, 3.0, 2.0])
    err2 = torch.tensor([40.0, 10.0, 30.0, 20.0])
    pred_var, observed, counts = reliability_curve(err2, var, bins=2)
    torch.testing.assert_close(pred_var, torch.tensor([1.5, 3.5], dtype=torch.float64))
    torch.testing.assert_close(observed, torch.tensor([15.0, 35.0], dtype=torch.float64))
    assert counts.tolist() == [2, 2]


def test_plot_reliability_writes_png(tmp_path: Path) -> None:
    x0, v = _setup(64)
    curves = reliability_at_t(KnownErrorDenoiser(x0[:1], v, 0.0, 1.0), x0, 500, kinds=("epistemic", "total"))
    with pytest.warns(UserWarning, match="epistemic"):  # all-zero variance: nothing to draw on log axes
        path = plot_reliability(curves, tmp_path / "plots" / "reliability.png", title="t=500")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_bad_inputs_are_clear_errors() -> None:
    x0, v = _setup(4)
    den = KnownErrorDenoiser(x0[:1], v, 0.5, 0.5)
    with pytest.raises(ValueError, match=r"timestep must be an integer in \[0, 999\]"):
        calibration_at_t(den, x0, [1000])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        calibration_at_t(den, x0 * 255, [10])
    with pytest.raises(ValueError, match="negative"):
        calibration_at_t(KnownErrorDenoiser(x0[:1], v, -0.5, 0.5), x0, [10])
    with pytest.raises(ValueError, match=r"shape \(1, 4, 4\) but the denoiser models \(1, 8, 8\)"):
        calibration_at_t(den, x0[:, :, :4, :4], [10])
    with pytest.raises(ValueError, match="same shape"):
        reliability_curve(torch.ones(4), torch.ones(5))
    with pytest.raises(ValueError, match="bins"):
        reliability_curve(torch.ones(4), torch.ones(4), bins=5)
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_reliability({"zero": reliability_curve(torch.ones(4), torch.zeros(4), bins=2)}, "unused.png")
