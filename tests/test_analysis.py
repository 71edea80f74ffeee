"""bdiff.analysis: the helpers behind the notebooks."""

from __future__ import annotations

import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from bdiff.analysis import (
    edge_uncertainty_correlation,
    ema_gap,
    image_grid,
    latest_checkpoint,
    posterior_snr,
    posterior_summary,
    record_stack,
    reliability_figure,
    resolve_checkpoint,
    side_by_side_extremes,
    sobel_magnitude,
    step_sizes,
    step_trace,
)
from bdiff.bayes import BayesConfig, BayesianUNet
from bdiff.checkpoint import load_model, read_checkpoint
from bdiff.nets import UNet, UNetConfig
from bdiff.sampling import DDIM, Sampler
from bdiff.sampler_callbacks import AdaptiveStepSize, Recorder, RecorderOutput


def tiny_unet() -> UNet:
    return UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(), num_heads=1))


def test_posterior_summary_matches_hand_computation() -> None:
    torch.manual_seed(0)
    model = BayesianUNet(tiny_unet(), BayesConfig(layers="head", prior_scale=2.0, guide_init_scale=0.01))
    loc, _ = model.posterior_loc_scale()["head.weight"]
    with torch.no_grad():
        loc.add_(0.5)  # move the posterior means away from the init by exactly 0.5
    rows = posterior_summary(model)
    assert [r["name"] for r in rows] == ["head.weight", "head.bias"]
    w = rows[0]
    p_loc, p_scale = model.prior.prior("head.weight")
    assert w["prior_std"] == pytest.approx(float(p_scale.mean()))
    assert w["posterior_std"] == pytest.approx(0.01, rel=1e-4)
    assert w["std_ratio"] == pytest.approx(0.01 / w["prior_std"], rel=1e-4)
    assert w["shift"] == pytest.approx(0.5, rel=1e-5)
    assert w["shift_in_prior_std"] == pytest.approx(0.5 / w["prior_std"], rel=1e-5)
    assert w["numel"] == loc.numel()
    with torch.no_grad():
        assert sum(r["kl"] for r in rows) == pytest.approx(float(model.kl_divergence()), rel=1e-5)
    assert w["kl_per_weight"] == pytest.approx(w["kl"] / w["numel"])
    snr = posterior_snr(model)["head.weight"]
    assert snr.shape == (loc.numel(),)
    assert w["snr_median"] == pytest.approx(float(snr.median()))


def test_posterior_summary_empty_for_deterministic_model() -> None:
    assert posterior_summary(BayesianUNet(tiny_unet(), BayesConfig(layers="none"))) == []


def test_ema_gap() -> None:
    key = "denoiser.model.guide.locs.head__weight_unconstrained"  # the key format of saved checkpoints
    scale = {"denoiser.model.guide.scales.head__weight_unconstrained": torch.zeros(4)}
    ckpt = {"state_dict": {key: torch.zeros(4), **scale}, "current_model_state": {key: torch.full((4,), 3.0), **scale}}
    assert ema_gap(ckpt) == {"head.weight": pytest.approx(3.0)}
    assert ema_gap({"state_dict": {key: torch.zeros(4), **scale}}) is None


def test_latest_and_resolve_checkpoint(tmp_path: Path, last_ckpt: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train one"):
        latest_checkpoint(tmp_path)
    old, new = (tmp_path / name / "checkpoints" for name in ("old", "new"))
    for folder in (old, new):
        folder.mkdir(parents=True)
        (folder / "last.ckpt").write_bytes(last_ckpt.read_bytes())
    now = time.time()
    os.utime(old / "last.ckpt", (now - 100, now - 100))
    assert latest_checkpoint(tmp_path) == new / "last.ckpt"
    # A newer non-Bayesian checkpoint is skipped when a Bayesian one exists.
    ckpt = read_checkpoint(last_ckpt)
    ckpt["hyper_parameters"]["bayes"]["layers"] = "none"
    det = tmp_path / "det" / "checkpoints"
    det.mkdir(parents=True)
    torch.save(ckpt, det / "last.ckpt")
    os.utime(det / "last.ckpt", (now + 100, now + 100))
    assert latest_checkpoint(tmp_path) == new / "last.ckpt"
    assert latest_checkpoint(tmp_path, prefer_bayesian=False) == det / "last.ckpt"
    assert resolve_checkpoint(None, tmp_path) == new / "last.ckpt"
    assert resolve_checkpoint(str(last_ckpt)) == last_ckpt
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing.ckpt")


def test_sobel_magnitude_finds_a_vertical_edge() -> None:
    img = torch.zeros(1, 1, 8, 8)
    img[..., 4:] = 1.0
    mag = sobel_magnitude(img)
    assert mag.shape == (1, 8, 8)
    assert torch.allclose(mag[0, :, 3:5], torch.full((8, 2), 4.0))  # |[-1,0,1]x[1,2,1]| across the step
    assert mag[0, :, :3].abs().max() == 0 and mag[0, :, 5:].abs().max() == 0
    with pytest.raises(ValueError, match="N,C,H,W"):
        sobel_magnitude(torch.zeros(8, 8))


def test_edge_uncertainty_correlation() -> None:
    img = torch.zeros(3, 1, 8, 8)
    img[..., 4:] = 1.0
    edge = sobel_magnitude(img)[:, None]
    on_edges = edge_uncertainty_correlation(img, (edge + 0.1) ** 2)  # std = edge + 0.1: perfectly correlated
    assert on_edges["per_sample"].shape == (3,)
    assert torch.allclose(on_edges["per_sample"], torch.ones(3), atol=1e-5)
    assert on_edges["pooled"] == pytest.approx(1.0, abs=1e-5)
    assert on_edges["edge_std"] > on_edges["background_std"]
    off_edges = edge_uncertainty_correlation(img, (4.1 - edge) ** 2)
    assert off_edges["pooled"] == pytest.approx(-1.0, abs=1e-5)
    assert off_edges["edge_std"] < off_edges["background_std"]
    flat = edge_uncertainty_correlation(img, torch.ones_like(img))
    assert torch.equal(flat["per_sample"], torch.zeros(3))  # constant std: correlation 0, not NaN
    with pytest.raises(ValueError, match="same shape"):
        edge_uncertainty_correlation(img, torch.ones(3, 1, 4, 4))


@pytest.fixture(scope="module")
def denoiser(last_ckpt: Path):
    return load_model(last_ckpt)


def test_step_trace_and_sizes_fixed_grid(denoiser) -> None:
    sampler = Sampler(denoiser, DDIM(), steps=5, callbacks=[Recorder(keys=("var",), max_samples=2)])
    res = sampler.sample(3, seed=0)
    records = res.output(RecorderOutput).records
    trace = step_trace(records)
    assert trace.shape == (5, 2)
    assert trace[:, 0].tolist() == sampler.grid[:-1].tolist()  # the t each step started from
    sizes = step_sizes(records)
    assert len(sizes) == 2
    assert int(sizes[0].sum()) == int(sampler.grid[0]) + 1  # from the first t all the way to -1
    assert record_stack(records, "var").shape == (5, 2, 1, 8, 8)
    with pytest.raises(KeyError, match="recorded keys"):
        record_stack(records, "x0")
    with pytest.raises(ValueError, match="no records"):
        step_trace([])


def test_step_sizes_adaptive_match_nfe(denoiser) -> None:
    callbacks = [AdaptiveStepSize(tol=0.5, max_extra_nfe=4), Recorder(keys=(), max_samples=4)]
    res = Sampler(denoiser, DDIM(), steps=10, callbacks=callbacks).sample(4, seed=1)
    sizes = step_sizes(res.output(RecorderOutput).records)
    start = int(step_trace(res.output(RecorderOutput).records)[0, 0])
    for i, s in enumerate(sizes):
        assert len(s) == int(res.nfe[i])  # one step per denoiser call (no refinement here)
        assert int(s.sum()) == start + 1


def test_side_by_side_extremes() -> None:
    var = torch.arange(6.0)[:, None, None, None].expand(6, 1, 2, 2)[[3, 0, 5, 1, 4, 2]].clone()
    images = var.clone()
    out = side_by_side_extremes(images, var, k=2)
    assert out["least"].tolist() == [1, 3]  # variances 0, 1
    assert out["most"].tolist() == [2, 4]  # variances 5, 4
    assert torch.equal(out["most_images"], images[[2, 4]])
    assert out["least_variance"].shape == (2, 1, 2, 2)
    assert out["score"].shape == (6,)
    with pytest.raises(ValueError, match="k must be"):
        side_by_side_extremes(images, var, k=4)


def test_figures_build() -> None:
    import matplotlib.pyplot as plt

    fig = image_grid({"a": torch.rand(3, 1, 8, 8), "b": torch.rand(3, 8, 8)}, col_titles=["x", "y", "z"], title="t")
    assert len(fig.axes) == 6
    plt.close(fig)
    with pytest.raises(ValueError, match="same number"):
        image_grid({"a": torch.rand(3, 1, 8, 8), "b": torch.rand(2, 1, 8, 8)})
    curve = (torch.tensor([0.1, 1.0]).double(), torch.tensor([0.2, 0.9]).double(), torch.tensor([5, 5]))
    fig = reliability_figure({10: {"total": curve}, 500: {"total": curve}})
    assert [ax.get_title() for ax in fig.axes] == ["t = 10", "t = 500"]
    plt.close(fig)


def test_prior_scale_sweep_trains_under_each_prior_scale(last_ckpt) -> None:
    from bdiff.analysis import prior_scale_sweep

    rows = prior_scale_sweep(last_ckpt, prior_scales=(0.1, 10.0), steps=2, batch_size=32)
    assert {(r["prior_scale"], r["parameter"]) for r in rows} == {
        (s, p) for s in (0.1, 10.0) for p in ("head.weight", "head.bias")
    }
    head = {r["prior_scale"]: r for r in rows if r["parameter"] == "head.weight"}
    assert head[10.0]["prior_std"] == pytest.approx(100 * head[0.1]["prior_std"])
    assert all(r["kl_per_datum"] > 0 and r["posterior_std"] > 0 for r in rows)
    assert head[0.1]["kl_per_datum"] != pytest.approx(head[10.0]["kl_per_datum"])  # the prior scale matters
