"""Random-feature GP on the bottleneck (bdiff.bayes.bottleneck_gp): its maths, its use by the denoiser, training."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from bdiff.bayes import BayesConfig, BayesianUNet
from bdiff.bayes.bottleneck_gp import BottleneckGP
from bdiff.checkpoint import load_model, read_checkpoint
from bdiff.evaluate import digits_split
from bdiff.nets import UNet, UNetConfig
from bdiff.schedule import NoiseSchedule
from tests.conftest import CONFIGS, cli_args


@pytest.fixture(scope="module")
def denoiser(last_ckpt: Path):
    return load_model(last_ckpt)


@pytest.fixture(scope="module")
def fitted(denoiser):
    x0 = digits_split("train")[:96] * 2 - 1
    return BottleneckGP.fit(denoiser.model, denoiser.schedule, x0.split(32), features=512, draws=2), x0


def training_activations(denoiser, x0: torch.Tensor) -> torch.Tensor:
    """The activations ``fit`` saw (the same seeded (t, noise) draws, seed 0)."""
    g, acts, schedule = torch.Generator().manual_seed(0), [], denoiser.schedule
    for batch in x0.split(32):
        for _ in range(2):
            t = torch.randint(0, schedule.timesteps, (batch.shape[0],), generator=g)
            x_t = schedule.q_sample(batch, t, torch.randn(batch.shape, generator=g))
            acts.append(denoiser.model.net.encode(x_t, t)[0].flatten(1))
    return torch.cat(acts)


def random_features(gp: BottleneckGP, h: torch.Tensor) -> torch.Tensor:
    z = (h - gp.center) / gp.scale
    return ((2.0 / gp.covariance.shape[0]) ** 0.5 * torch.cos(z @ gp.freqs + gp.phases)).double()


def test_variance_is_the_gp_posterior_variance_of_its_kernel(denoiser, fitted) -> None:
    """D-space formula (what predict uses) == n-space GP formula k(x,x) - k_x^T (K + noise I)^-1 k_x."""
    gp, x0 = fitted
    train_phi = random_features(gp, training_activations(denoiser, x0))
    query = denoiser.model.net.encode(torch.randn(5, 1, 8, 8), torch.tensor([5, 50, 200, 500, 900]))[0].flatten(1)
    q = random_features(gp, query)
    gram = train_phi @ train_phi.T + gp.noise * torch.eye(len(train_phi), dtype=torch.float64)
    k_x = train_phi @ q.T  # (n, 5)
    want = (q * q).sum(1) - (k_x * torch.linalg.solve(gram, k_x)).sum(0)
    torch.testing.assert_close(gp.gp_variance(query).double(), want, rtol=1e-3, atol=1e-5)


def test_training_activations_are_certain_and_far_ones_are_not(denoiser, fitted) -> None:
    gp, x0 = fitted
    seen = gp.gp_variance(training_activations(denoiser, x0))
    g = torch.Generator().manual_seed(0)
    far = gp.gp_variance(gp.center + 50 * gp.scale * torch.randn(8, gp.center.numel(), generator=g))
    assert seen.mean() < 0.2 < 0.5 < far.mean() < 1.1  # the prior variance k(x, x) is ~1


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
    torch.testing.assert_close(added, gp.gp_variance(h) * gp.signal.scale(t), rtol=1e-4, atol=1e-9)
    # s(t) is the mean aleatoric variance of training images at t: the GP's share never exceeds it
    assert (added <= gp.signal.scale(t) * 1.1).all()


def test_it_survives_a_weights_only_checkpoint_round_trip(denoiser, fitted) -> None:
    gp, _ = fitted
    buffer = io.BytesIO()
    torch.save(gp.to_dict(), buffer)
    buffer.seek(0)
    again = BottleneckGP.from_dict(torch.load(buffer, weights_only=True))
    h = denoiser.model.net.encode(torch.randn(4, 1, 8, 8), torch.tensor([1, 10, 100, 999]))[0].flatten(1)
    torch.testing.assert_close(again.gp_variance(h), gp.gp_variance(h))


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
