"""bdiff.lit.ema.EMA: the same weight average as Lightning's EMAWeightAveraging, with torch's multi-tensor update."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bdiff.lit.ema import EMA


class Regression(pl.LightningModule):
    """A small conv + linear regression with a BatchNorm buffer (so buffers are averaged too)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return ((self.net(x).squeeze(1) - y) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def fit(callback: pl.Callback) -> dict[str, torch.Tensor]:
    """Weights after 12 steps with ``callback`` (the average is copied into the model at the end of fit)."""
    pl.seed_everything(0, verbose=False)
    data = TensorDataset(torch.randn(48, 1, 4, 4), torch.randn(48))
    model = Regression()
    trainer = pl.Trainer(max_steps=12, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, DataLoader(data, batch_size=4))
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_ema_matches_lightnings_ema_weight_averaging() -> None:
    ours, theirs = fit(EMA(decay=0.8)), fit(EMAWeightAveraging(decay=0.8))
    plain = fit(pl.Callback())
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.allclose(ours["net.3.weight"], plain["net.3.weight"])  # an average, not the last weights


def test_ema_updates_on_the_same_steps_as_lightnings() -> None:
    when = {"update_every_n_steps": 3, "update_starting_at_step": 5}
    ours, theirs = EMA(**when), EMAWeightAveraging(**when)
    for step in range(12):
        assert ours.should_update(step_idx=step) == theirs.should_update(step_idx=step)


@pytest.mark.parametrize("decay", [-0.1, 1.0, float("nan")])
def test_a_decay_outside_0_1_is_refused(decay: float) -> None:
    with pytest.raises(ValueError, match="EMA decay must be in"):
        EMA(decay=decay)


def test_load_model_restores_the_ema_or_the_optimizers_weights(last_ckpt) -> None:
    """``weights="average"`` (default) is the EMA the checkpoint ships; ``"current"`` the raw training weights."""
    from bdiff.checkpoint import PREFIX, load_model, read_checkpoint

    ckpt = read_checkpoint(last_ckpt)
    average, current = load_model(last_ckpt).state_dict(), load_model(last_ckpt, weights="current").state_dict()
    for name, saved in (("state_dict", average), ("current_model_state", current)):
        for key, value in ckpt[name].items():
            if key.startswith(PREFIX):
                torch.testing.assert_close(saved[key[len(PREFIX):]], value, rtol=0, atol=0)
    assert any(not torch.equal(average[k], current[k]) for k in average)
    with pytest.raises(ValueError, match="'average'.*'current'"):
        load_model(last_ckpt, weights="ema")


def test_sigma_rel_gives_edm2s_gamma() -> None:
    """EDM2 (Karras et al. 2024) pairs sigma_rel 0.05 and 0.10 with gamma 16.97 and 6.94."""
    from bdiff.lit.ema import sigma_rel_to_gamma

    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10])
@pytest.mark.parametrize("steps", [400, 4000])
def test_power_ema_averages_over_a_fixed_fraction_of_any_run(sigma_rel: float, steps: int) -> None:
    """The weight each step gets in the final average: its spread over the run is sigma_rel x the run's
    length, for a short run as for a long one (a constant decay's window would not scale)."""
    from bdiff.lit.ema import power_ema_multi_avg_fn, sigma_rel_to_gamma

    update = power_ema_multi_avg_fn(sigma_rel_to_gamma(sigma_rel))
    averaged = [torch.zeros(steps, dtype=torch.float64)]
    averaged[0][0] = 1.0  # the first model is copied in; then one impulse per step, tracked per coordinate
    for t in range(1, steps):
        current = torch.zeros(steps, dtype=torch.float64)
        current[t] = 1.0
        update(averaged, [current], torch.tensor(t))
    weights = averaged[0]
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-9)
    position = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    mean = (weights * position).sum()
    std = ((weights * (position - mean) ** 2).sum()).sqrt()
    assert std.item() == pytest.approx(sigma_rel, rel=0.05)


def test_power_ema_in_a_fit_leaves_the_last_weights_behind_less_than_a_slow_decay() -> None:
    ours, slow, plain = fit(EMA(sigma_rel=0.1)), fit(EMA(decay=0.999)), fit(pl.Callback())
    distance = {name: (w["net.3.weight"] - plain["net.3.weight"]).norm() for name, w in (("ours", ours), ("slow", slow))}
    assert 0 < distance["ours"] < distance["slow"]


@pytest.mark.parametrize("sigma_rel", [0.0, 0.3, float("nan"), "wide"])
def test_a_sigma_rel_outside_its_range_is_refused(sigma_rel: object) -> None:
    with pytest.raises(ValueError, match="EMA sigma_rel must be"):
        EMA(sigma_rel=sigma_rel)  # type: ignore[arg-type]


def test_a_constant_decay_too_slow_for_the_run_is_warned_about() -> None:
    with pytest.warns(UserWarning, match="still holds .* of the initial weights"):
        fit(EMA(decay=0.99))  # 0.99 ** 12: 89% of the initial weights left
