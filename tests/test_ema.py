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
