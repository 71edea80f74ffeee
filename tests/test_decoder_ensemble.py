"""Decoder branches on a frozen encoder (bdiff.bayes.decoder_ensemble)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from bdiff.bayes.decoder_ensemble import DecoderEnsemble
from bdiff.checkpoint import load_model
from bdiff.evaluate import digits_split


@pytest.fixture(scope="module")
def denoiser(last_ckpt: Path):
    return load_model(last_ckpt)


def test_each_member_is_the_trained_encoder_under_its_own_decoder(denoiser) -> None:
    ens = DecoderEnsemble(denoiser.model, denoiser.schedule, members=3, seed=5)
    x_t, t = torch.randn(4, 1, 8, 8), torch.tensor([10, 100, 400, 900])
    with torch.no_grad():
        got = ens.members_eps(*denoiser.model.net.encode(x_t, t))
    assert got.shape == (3, 4, 1, 8, 8)
    for m in range(3):
        net = copy.deepcopy(denoiser.model.net)
        with torch.no_grad():
            for name, p in zip(ens.names, ens.stacked, strict=True):
                net.get_parameter(name).copy_(p[m])
            want = net(x_t, t)[0]
        torch.testing.assert_close(got[m], want, rtol=1e-4, atol=1e-5)


def test_training_moves_only_the_members_and_keeps_the_models_mean(denoiser) -> None:
    ens = DecoderEnsemble(denoiser.model, denoiser.schedule, members=2)
    before = {n: p.detach().clone() for n, p in denoiser.model.named_parameters()}
    x0 = digits_split("train")[:256] * 2 - 1
    losses = ens.fit(x0.split(64), steps=40)
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    for n, p in denoiser.model.named_parameters():
        torch.testing.assert_close(p, before[n], msg=f"{n} changed")
    x_t, t = torch.randn(3, 1, 8, 8), torch.tensor([20, 200, 600])
    pred, base = ens.predict(x_t, t), denoiser.predict_uncalibrated(x_t, t)
    torch.testing.assert_close(pred.eps, base.eps)
    # at the head's posterior mean, vs the predictive's E[exp(log_var)]: equal up to the tiny posterior spread
    torch.testing.assert_close(pred.var_aleatoric, base.var_aleatoric, rtol=1e-3, atol=1e-6)
    assert (pred.var_epistemic > 0).all()


def test_bad_settings_are_refused(denoiser) -> None:
    with pytest.raises(ValueError, match=">= 2 members"):
        DecoderEnsemble(denoiser.model, denoiser.schedule, members=1)
    with pytest.raises(ValueError, match="at least one batch"):
        DecoderEnsemble(denoiser.model, denoiser.schedule, members=2).fit([], steps=1)
