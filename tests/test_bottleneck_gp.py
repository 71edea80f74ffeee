"""Per-t nearest-neighbour GP on the bottleneck (bdiff.bayes.bottleneck_gp): its maths, its use by the denoiser, training."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from bdiff.bayes import BayesConfig, BayesianUNet
from bdiff.bayes.bottleneck_gp import BottleneckGP, restore
from bdiff.checkpoint import load_model, read_checkpoint
from bdiff.datasets import digits_split
from bdiff.nets import UNet, UNetConfig
from bdiff.schedule import NoiseSchedule
from tests.conftest import CONFIGS, cli_args


@pytest.fixture(scope="module")
def denoiser(last_ckpt: Path):
    return load_model(last_ckpt)


@pytest.fixture(scope="module")
def fitted(denoiser):
    x0 = digits_split("train")[:96] * 2 - 1
    return BottleneckGP.fit(denoiser.model, denoiser.schedule, x0.split(32), knots=6, dims=8, draws=2), x0


def activations(denoiser, x0: torch.Tensor, t: int, seed: int = 1) -> torch.Tensor:
    """Flattened bottleneck activations (N, d) of x0 noised to t with fresh noise."""
    tt = torch.full((len(x0),), t)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    return denoiser.model.net.encode(denoiser.schedule.q_sample(x0, tt, noise), tt)[0].flatten(1)


@pytest.mark.parametrize("k", [0, 2, -1])
def test_at_a_knot_it_is_the_exact_gp_posterior_variance(denoiser, fitted, k: int) -> None:
    """Conditioned on every training activation, v == k(x,x) - k_x^T (K + noise I)^-1 k_x on the knot's features;
    conditioned on fewer (the nearest), v can only be larger: a GP's variance shrinks with every point it sees."""
    gp, x0 = fitted
    gp = BottleneckGP.from_dict(gp.to_dict())
    k = k % len(gp.knots)
    t = int(gp.knots[k])
    query = activations(denoiser, torch.cat([x0[:4], torch.rand(4, 1, 8, 8) * 2 - 1]), t)
    train = gp.points[k].double()
    z = ((query - gp.center[k]) @ gp.projection[k]).double()
    gram = torch.exp(-torch.cdist(train, train) ** 2 / 2) + gp.noise * torch.eye(len(train), dtype=torch.float64)
    k_x = torch.exp(-torch.cdist(train, z) ** 2 / 2)  # (N, 8)
    want = 1 - (k_x * torch.linalg.solve(gram, k_x)).sum(0)
    gp.neighbours = len(train)
    tt = torch.full((len(query),), t)
    torch.testing.assert_close(gp.gp_variance(query, tt).double(), want, rtol=1e-3, atol=1e-4)
    fewer = []
    for m in (96, 32, 8):
        gp.neighbours = m
        fewer.append(gp.gp_variance(query, tt).double())
    assert (want - 1e-4 <= fewer[0]).all() and (fewer[0] - 1e-4 <= fewer[1]).all() and (fewer[1] - 1e-4 <= fewer[2]).all()


def test_between_knots_it_interpolates_in_log_snr(denoiser, fitted) -> None:
    gp, _ = fitted
    lo, hi = int(gp.knots[3]), int(gp.knots[4])
    t = (lo + hi) // 2
    h = activations(denoiser, torch.rand(5, 1, 8, 8) * 2 - 1, t)
    at = lambda s: gp.gp_variance(h, torch.full((5,), s))  # noqa: E731  (a knot's own GP, alone)
    w = float((gp.log_snr[t] - gp.log_snr[lo]) / (gp.log_snr[hi] - gp.log_snr[lo]))
    assert 0 < w < 1
    torch.testing.assert_close(gp.gp_variance(h, torch.full((5,), t)), (1 - w) * at(lo) + w * at(hi))
    # a batch of mixed t gives each image what it gets alone
    ts = torch.tensor([0, lo, t, hi, 999])
    alone = torch.cat([gp.gp_variance(h[i : i + 1], ts[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(gp.gp_variance(h, ts), alone)


def test_fitting_leaves_torchs_random_state_alone(denoiser) -> None:
    """Training with the GP refitted at every validation must draw the same numbers as training without it."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    BottleneckGP.fit(denoiser.model, denoiser.schedule, [digits_split("train")[:32] * 2 - 1], knots=3, draws=1)
    assert torch.equal(torch.get_rng_state(), cpu)
    if cuda is not None:
        assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda))


def test_it_runs_in_fp32_under_autocast_and_refuses_timesteps_out_of_range(denoiser, fitted) -> None:
    gp, _ = fitted
    t = torch.tensor([0, 30, 400, 999])
    h = activations(denoiser, torch.rand(4, 1, 8, 8) * 2 - 1, 30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = gp.gp_variance(h.bfloat16(), t)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, gp.gp_variance(h.bfloat16().float(), t))
    for bad in (-1, 1000):
        with pytest.raises(ValueError, match=r"timesteps in \[0, 999\]"):
            gp.gp_variance(h[:1], torch.tensor([bad]))


def test_training_activations_are_certain_and_far_ones_are_not(denoiser, fitted) -> None:
    gp, x0 = fitted
    t = int(gp.knots[1])
    seen = gp.gp_variance(activations(denoiser, x0, t), torch.full((len(x0),), t))
    g = torch.Generator().manual_seed(0)
    far_h = gp.center[1] + 50 * torch.randn(8, gp.center.shape[1], generator=g) * gp.center[1].abs().mean()
    far = gp.gp_variance(far_h, torch.full((8,), t))
    assert seen.mean() < 0.3 < 0.9 < far.mean() <= 1  # the prior variance k(x, x) is 1


def test_the_denoiser_adds_it_to_the_heads_epistemic_and_keeps_its_mean(last_ckpt: Path, denoiser, fitted) -> None:
    gp, _ = fitted
    with_gp = load_model(last_ckpt)
    with_gp.epistemic_gp = gp
    x_t, t = torch.randn(3, 1, 8, 8), torch.tensor([20, 200, 600])
    pred, base = with_gp.predict_uncalibrated(x_t, t), denoiser.predict_uncalibrated(x_t, t)
    torch.testing.assert_close(pred.eps, base.eps)
    torch.testing.assert_close(pred.var_aleatoric, base.var_aleatoric)
    added = (pred.var_epistemic - base.var_epistemic).mean(dim=(1, 2, 3))
    h = denoiser.model.net.encode(x_t, t)[0].flatten(1)
    torch.testing.assert_close(added, gp.gp_variance(h, t) * gp.signal.scale(t), rtol=1e-4, atol=1e-9)


def test_it_survives_a_weights_only_checkpoint_round_trip(denoiser, fitted) -> None:
    gp, _ = fitted
    buffer = io.BytesIO()
    torch.save(gp.to_dict(), buffer)
    buffer.seek(0)
    again = BottleneckGP.from_dict(torch.load(buffer, weights_only=True))
    t = torch.tensor([1, 10, 100, 999])
    h = denoiser.model.net.encode(torch.randn(4, 1, 8, 8), t)[0].flatten(1)
    torch.testing.assert_close(again.gp_variance(h, t), gp.gp_variance(h, t))


def test_a_checkpoint_with_the_earlier_random_feature_gp_loads_without_it() -> None:
    old = {"center": torch.zeros(4), "scale": torch.ones(4), "lengthscale": 1.0, "seed": 1,
           "covariance": torch.eye(8), "signal": {}, "noise": 0.1}
    with pytest.warns(UserWarning, match="random features.*Refit it"):
        assert restore(old) is None
    with pytest.raises(ValueError, match="random features.*refit"):
        BottleneckGP.from_dict(old)


def test_training_with_epistemic_gp_ships_it_in_the_checkpoint(tmp_path: Path) -> None:
    from bdiff.lit.cli import main

    cli = main(CONFIGS / "digits.yaml", cli_args(tmp_path, "--model.epistemic_gp=true"))
    ckpt = Path(cli.trainer.checkpoint_callback.last_model_path)
    assert "bottleneck_gp" in read_checkpoint(ckpt)
    den = load_model(ckpt)
    assert den.epistemic_gp is not None
    x_t, t = torch.randn(2, 1, 8, 8), torch.tensor([30, 300])
    den_off = load_model(ckpt)
    den_off.epistemic_gp = None
    assert (den.predict(x_t, t).var_epistemic > den_off.predict(x_t, t).var_epistemic).all()


def test_bad_use_is_refused(denoiser) -> None:
    with pytest.raises(ValueError, match="at least one batch"):
        BottleneckGP.fit(denoiser.model, denoiser.schedule, [])
    with pytest.raises(ValueError, match="noise > 0"):
        BottleneckGP.fit(denoiser.model, denoiser.schedule, [torch.zeros(2, 1, 8, 8)], noise=0.0)
    with pytest.raises(ValueError, match="knots >= 2"):
        BottleneckGP.fit(denoiser.model, denoiser.schedule, [torch.zeros(2, 1, 8, 8)], knots=1)
    net = UNet(UNetConfig(base_channels=8, num_heads=2))
    with pytest.raises(ValueError, match="only Bayesian layers are the head"):
        BottleneckGP.fit(BayesianUNet(net, BayesConfig(layers="all")), NoiseSchedule(), [torch.zeros(2, 1, 8, 8)])


def test_training_with_epistemic_gp_needs_a_datamodule(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from bdiff.lit.module import DiffusionModule

    model = DiffusionModule(net=UNetConfig(base_channels=8, num_heads=2), epistemic_gp=True)
    trainer = pl.Trainer(max_steps=1, logger=False, default_root_dir=tmp_path, enable_progress_bar=False)
    with pytest.raises(ValueError, match="needs|datamodule"):
        trainer.fit(model, DataLoader(torch.zeros(4, 1, 8, 8), batch_size=2))
    with pytest.raises(ValueError, match="only Bayesian layers are the head"):
        DiffusionModule(net=UNetConfig(base_channels=8, num_heads=2), bayes=BayesConfig(layers="all"), epistemic_gp=True)
