"""The learned critic: training through the CLI, loading, the guidance maths, the bounded loop, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bdiff.critic import Critic, CriticConfig, CriticNet, load_critic
from bdiff.denoiser import Prediction
from bdiff.sampling import DDIM, DPMSolverPP2M, Sampler, SamplerCallback
from bdiff.sampler_callbacks import VarianceWeightedBlending
from bdiff.sampler_callbacks import BlendOutput
from bdiff.sampler_callbacks.critic import CriticCorrection, CriticOutput
from bdiff.sampling.noise import NoiseSource
from bdiff.sampling.recipe import load_recipe
from bdiff.schedule import NoiseSchedule

S_MODEL, S_DATA = 0.25, 0.09  # per-pixel variances of the model's and the data's Gaussian


class GaussianDenoiser:
    """Exact eps-MMSE denoiser for N(0, S_MODEL) images (the "model" distribution).

    ``epistemic`` > 0 adds a constant epistemic variance, so Bayesian-only callbacks accept it.
    """

    image_shape = (1, 2, 2)

    def __init__(self, epistemic: float = 0.0) -> None:
        self.schedule = NoiseSchedule("linear")
        self.epistemic = epistemic
        self.is_bayesian = epistemic > 0

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> Prediction:
        a = self.schedule.alpha_bar(t, x)
        denom = a * S_MODEL + (1 - a)
        return Prediction((1 - a).sqrt() / denom * x, torch.full_like(x, self.epistemic), (a * S_MODEL / denom).expand_as(x))

    def epistemic_error(self, pred: Prediction, t: torch.Tensor) -> torch.Tensor:
        """The error of the mean in eps units: the epistemic variance itself (r(t) = 1)."""
        return pred.var_epistemic


class OptimalGaussianCritic(nn.Module):
    """The Bayes-optimal discriminator between N(0, S_DATA) and N(0, S_MODEL) data, forward-noised to t.

    logit(x_t, t) = log N(x_t; 0, a S_DATA + 1 - a) - log N(x_t; 0, a S_MODEL + 1 - a), summed over pixels.
    """

    def __init__(self, schedule: NoiseSchedule, constant: float | None = None, offset: float = 0.0) -> None:
        super().__init__()
        self.config = CriticConfig(image_size=2, in_channels=1, width=8, levels=1)
        self.schedule, self.constant, self.offset = schedule, constant, offset
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.constant is not None:
            return self.constant + 0 * x.flatten(1).sum(1)
        a = self.schedule.alpha_bar(t, x)
        vd, vm = a * S_DATA + 1 - a, a * S_MODEL + 1 - a
        return self.offset + (-0.5 * x**2 / vd - 0.5 * vd.log() + 0.5 * x**2 / vm + 0.5 * vm.log()).flatten(1).sum(1)


def gaussian_critic(constant: float | None = None, offset: float = 0.0) -> Critic:
    """The optimal critic (plus ``offset``), or one that says ``constant`` everywhere (zero gradient)."""
    schedule = NoiseSchedule("linear")
    return Critic(OptimalGaussianCritic(schedule, constant, offset), schedule, "optimal-gaussian")  # type: ignore[arg-type]


def test_guidance_with_the_optimal_critic_turns_model_samples_into_data_samples() -> None:
    """DG, eq. 9 of Kim et al.: with the optimal discriminator and w=1 the corrected score is the data score.

    The model makes N(0, 0.25) images; the data is N(0, 0.09). 50-step DPM-Solver++(2M) without the critic
    reproduces the model's variance, with it the data's (Monte Carlo over 4,000 samples, 16,000 pixels).
    """
    den = GaussianDenoiser()
    plain = Sampler(den, DPMSolverPP2M(), 50).sample(4000, seed=0, clip=False).images
    corrected = Sampler(den, DPMSolverPP2M(), 50, [CriticCorrection(gaussian_critic(), weight=1.0, retries=0)])
    guided = corrected.sample(4000, seed=0, clip=False).images
    assert plain.var().item() == pytest.approx(S_MODEL, rel=0.05)
    assert guided.var().item() == pytest.approx(S_DATA, rel=0.05)


def test_guidance_shifts_x0_by_w_sigma2_over_sqrt_alpha_times_the_gradient() -> None:
    den, critic = GaussianDenoiser(), gaussian_critic()
    cb = CriticCorrection(critic, weight=0.7, retries=0, t_range=(400, 999))
    sampler = Sampler(den, DDIM(), 4, [cb])
    state = sampler.init_state(torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0)), NoiseSource(0, range(3)))
    state.outputs = {cb: cb.on_start(state, sampler)}
    sampler._predict(state)
    before = state.x0.clone()
    cb.after_prediction(state, sampler)
    t = state.t
    _, grad = critic.logit_and_grad(state.x, t)
    a = den.schedule.alpha_bar(t, state.x)
    torch.testing.assert_close(state.x0 - before, 0.7 * (1 - a) / a.sqrt() * grad)
    assert state.outputs[cb].critic_calls.tolist() == [1, 1, 1]
    eps = den.schedule.x0_to_eps(state.x, state.t, state.x0)  # eps and x0 agree after the correction
    torch.testing.assert_close(state.prediction.eps, eps)


@pytest.mark.parametrize("retries", [0, 1, 3])
def test_flagged_samples_go_back_at_most_retries_times_and_every_call_is_counted(retries: int) -> None:
    den = GaussianDenoiser()
    always_bad = gaussian_critic(constant=-5.0)  # flags every finished sample
    cb = CriticCorrection(always_bad, weight=0.0, retries=retries, t_back=300)
    sampler = Sampler(den, DPMSolverPP2M(), 10, [cb])
    result = sampler.sample(4, seed=0)
    cost = cb.pass_cost(sampler)
    assert cost == 1 + sum(1 for t in sampler.grid.tolist() if 0 <= t < 300)
    assert result.nfe.tolist() == [10 + retries * cost] * 4
    mem = result.output(CriticOutput)
    assert mem.retries.tolist() == [retries] * 4 and bool(mem.flagged.all())
    assert mem.critic_calls.tolist() == [retries + 1] * 4  # one score per finish
    assert mem.summary()["flagged_share"] == 1.0
    assert torch.isfinite(result.images).all()


def test_an_nfe_budget_stops_the_loop_and_good_samples_are_not_sent_back() -> None:
    den = GaussianDenoiser()
    cb = CriticCorrection(gaussian_critic(constant=-5.0), weight=0.0, retries=3, t_back=300, max_nfe=12)
    sampler = Sampler(den, DPMSolverPP2M(), 10, [cb])
    assert int(sampler.sample(3, seed=0).nfe.max()) <= 12
    happy = Sampler(den, DPMSolverPP2M(), 10, [CriticCorrection(gaussian_critic(constant=5.0), weight=0.0, retries=3)])
    result = happy.sample(3, seed=0)
    assert result.nfe.tolist() == [10, 10, 10] and not result.output(CriticOutput).flagged.any()


class MemoryProbe(SamplerCallback):
    """Records the restart counters at every model call."""

    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def after_prediction(self, state, sampler) -> None:
        self.seen.append(state.restarts.tolist())


class ProbedDPMSolver(DPMSolverPP2M):
    """DPM-Solver++(2M) that records the a_prev of its memory at every step."""

    def __init__(self) -> None:
        self.a_prev: list[torch.Tensor] = []

    def step(self, x, x0, ctx, memory, noise):
        self.a_prev.append(memory.a.clone())
        return super().step(x, x0, ctx, memory, noise)


def test_a_restart_resets_the_multistep_memory_and_the_blending_filter() -> None:
    den = GaussianDenoiser(epistemic=1e-3)
    blend, probe, stepper = VarianceWeightedBlending(strength=1.0), MemoryProbe(), ProbedDPMSolver()
    cb = CriticCorrection(gaussian_critic(constant=-5.0), weight=0.0, retries=1, t_back=500)
    result = Sampler(den, stepper, 10, [blend, cb, probe]).sample(2, seed=3)
    first_after = next(i for i, restarts in enumerate(probe.seen) if restarts == [1, 1])
    assert first_after == 10
    assert torch.isnan(stepper.a_prev[first_after]).all(), "DPM++(2M) must take a first-order step after going back"
    assert not torch.isnan(stepper.a_prev[first_after + 1]).any()
    gains = result.output(BlendOutput).gain  # one per iteration after the first
    assert gains[first_after - 1] == 1.0, "the blending filter starts afresh: the new prediction is taken as is"
    assert all(g < 1.0 for g in gains[: first_after - 1]) and gains[first_after] < 1.0


def test_region_mode_only_changes_the_flagged_pixels() -> None:
    den = GaussianDenoiser()
    base = Sampler(den, DDIM(), 10).sample(8, seed=0, clip=False).images
    cb = CriticCorrection(gaussian_critic(offset=-100.0), weight=0.0, retries=1, t_back=300, mode="region",
                          region_quantile=0.5)
    result = Sampler(den, DDIM(), 10, [cb]).sample(8, seed=0, clip=False)
    mask = result.output(CriticOutput).mask
    unchanged = (result.images - base.clamp(-1, 1)).abs() < 1e-6
    assert bool(unchanged[~mask].all()), "pixels outside the critic's region must keep their value"
    assert bool((~unchanged[mask]).any()), "pixels inside the region are re-done"
    assert 0 < mask.float().mean() < 1 and bool(result.output(CriticOutput).flagged.all())


def test_samples_do_not_depend_on_the_batch_with_the_loop_on() -> None:
    den = GaussianDenoiser()
    critic = gaussian_critic()

    def sampler() -> Sampler:
        return Sampler(den, DPMSolverPP2M(), 8, [CriticCorrection(critic, weight=1.0, retries=2, threshold=3.0)])

    whole = sampler().sample(6, seed=5)
    parts = [sampler().sample(3, seed=5, first_index=i) for i in (0, 3)]
    torch.testing.assert_close(whole.images, torch.cat([p.images for p in parts]), rtol=0, atol=1e-5)
    assert whole.nfe.tolist() == torch.cat([p.nfe for p in parts]).tolist()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"retries": 11}, "retries"),
        ({"retries": -1}, "retries"),
        ({"weight": -1.0}, "weight"),
        ({"mode": "pixels"}, "mode"),
        ({"t_range": [10, 5]}, "t_range"),
        ({"max_nfe": 0}, "max_nfe"),
        ({"t_back": 0}, "t_back"),
    ],
)
def test_bad_critic_options_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CriticCorrection(gaussian_critic(), **kwargs)


def test_critic_for_another_image_size_or_schedule_is_refused_before_sampling() -> None:
    den = GaussianDenoiser()
    other_size = Critic(CriticNet(CriticConfig(image_size=4, width=8, levels=1)), NoiseSchedule("linear"))
    with pytest.raises(ValueError, match=r"images of shape \(1, 4, 4\)"):
        Sampler(den, DDIM(), 5, [CriticCorrection(other_size)])
    other_schedule = Critic(OptimalGaussianCritic(NoiseSchedule("cosine")), NoiseSchedule("cosine"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="another noise schedule"):
        Sampler(den, DDIM(), 5, [CriticCorrection(other_schedule)])


def test_critic_net_checks_its_input() -> None:
    net = CriticNet(CriticConfig(image_size=8, width=8, levels=2))
    assert net(torch.randn(3, 1, 8, 8), torch.tensor([0, 5, 999])).shape == (3,)
    with pytest.raises(ValueError, match="shape"):
        net(torch.randn(3, 3, 8, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="levels"):
        CriticConfig(image_size=6, levels=3).validate()


def test_critic_trains_through_the_cli_and_loads_weights_only(critic_run: Path, last_ckpt: Path) -> None:
    ckpt = critic_run / "digits" / "checkpoints" / "last.ckpt"
    critic = load_critic(ckpt)
    assert critic.image_shape == (1, 8, 8)
    raw = torch.load(ckpt, weights_only=True)
    assert raw["hyper_parameters"]["schedule"]["timesteps"] == 1000
    assert raw["hyper_parameters"]["diffusion_ckpt"] == str(last_ckpt)
    assert len(list((critic_run / "fakes").glob("*.pt"))) == 1, "generated images are cached once"
    x = torch.randn(4, 1, 8, 8)
    logit, grad = critic.logit_and_grad(x, torch.tensor([0, 10, 100, 900]))
    assert logit.shape == (4,) and grad.shape == x.shape and torch.isfinite(grad).all()


def test_sampler_recipe_with_the_critic_runs_from_the_entry_point(critic_run: Path, last_ckpt: Path, tmp_path: Path) -> None:
    from bdiff.metrics.samples_file import load_samples
    from bdiff.sample import main

    recipe = tmp_path / "critic.yaml"
    recipe.write_text(
        "stepper: DPMSolverPP2M\nsteps: 4\nposterior_samples: 2\ncallbacks:\n"
        "  - VarianceWeightedBlending\n"
        f"  - {{class_path: CriticCorrection, init_args: {{critic: {critic_run / 'digits' / 'checkpoints' / 'last.ckpt'}, weight: 1.0, retries: 1, "
        "threshold: 100.0, t_back: 300, max_nfe: 7}}\n"
    )
    main(["--ckpt", str(last_ckpt), "--sampler", str(recipe), "--n", "6", "--out", str(tmp_path / "s.npz")])
    s = load_samples(tmp_path / "s.npz")
    assert s.images.shape == (6, 1, 8, 8)
    assert s.nfe == 6  # every sample flagged (threshold 100), one pass of 2 calls (300 -> 249 -> -1 on a 4-step grid)


def test_bad_critic_checkpoints_are_refused_with_the_file_named(last_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a critic checkpoint"):
        load_critic(last_ckpt)
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="broken.ckpt"):
        load_critic(broken)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_critic(tmp_path / "missing.ckpt")
    recipe = load_recipe({"stepper": "DDIM", "steps": 3, "callbacks": [
        {"class_path": "CriticCorrection", "init_args": {"critic": str(tmp_path / "missing.ckpt")}}]})
    from bdiff.checkpoint import load_model

    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        recipe.build(load_model(last_ckpt))


def test_critic_data_draws_its_samples_once_in_prepare_data(last_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    """Under DDP only local rank 0 runs prepare_data; every rank's setup must then read the cache."""
    from bdiff.lit import critic_data

    recipe = tmp_path / "fast.yaml"
    recipe.write_text("stepper: DDIM\nsteps: 2\nposterior_samples: 2\n")
    cache = tmp_path / "fakes"
    critic_data.CriticDataModule(str(last_ckpt), sampler=str(recipe), cache_dir=str(cache)).prepare_data()
    assert len(list(cache.glob("*.pt"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("drew samples again although prepare_data had cached them")

    monkeypatch.setattr(critic_data, "generate_fakes", refuse)
    other_rank = critic_data.CriticDataModule(str(last_ckpt), sampler=str(recipe), cache_dir=str(cache))
    other_rank.setup("fit")
    labels = torch.cat([y for _, y in other_rank.train_dataloader()])
    assert set(labels.tolist()) == {0.0, 1.0} and int((labels == 0).sum()) == int((labels == 1).sum())
    critic_data.CriticDataModule(str(last_ckpt), sampler=str(recipe), cache_dir=None).prepare_data()  # nothing to share


def test_critic_data_with_more_fakes_per_real_keeps_the_splits_apart(last_ckpt: Path, tmp_path: Path) -> None:
    """fakes_per_real k: k generated images per real one in train and in val, none shared between them."""
    from bdiff.lit import critic_data

    recipe = tmp_path / "fast.yaml"
    recipe.write_text("stepper: DDIM\nsteps: 2\nposterior_samples: 2\n")
    data = critic_data.CriticDataModule(str(last_ckpt), sampler=str(recipe), cache_dir=str(tmp_path / "fakes"),
                                        fakes_per_real=3)
    data.setup("fit")
    fakes = {}
    for split, loader, n_real in (("train", data.train_dataloader(), len(data.real.train_dataset)),
                                  ("val", data.val_dataloader(), len(data.real.val_dataset))):
        x, y = (torch.cat(parts) for parts in zip(*loader))
        assert int((y == 1).sum()) == n_real and int((y == 0).sum()) == 3 * n_real
        fakes[split] = x[y == 0].flatten(1)
    assert torch.cdist(fakes["val"], fakes["train"]).min() > 0  # different draws, not the train fakes again
    with pytest.raises(ValueError, match="fakes_per_real must be an integer >= 1"):
        critic_data.CriticDataModule(str(last_ckpt), sampler=str(recipe), fakes_per_real=0)


def test_a_critic_trained_on_k_fakes_per_real_gets_log_k_back_on_its_logit(critic_run: Path, tmp_path: Path) -> None:
    """With k generated images per real one the optimal logit is log p_data/p_model - log k: load_critic
    adds log k (recorded in the checkpoint) so a threshold means the same for any k; the gradient is unchanged."""
    import math

    path = critic_run / "digits" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["fakes_per_real"] == 1
    ckpt["hyper_parameters"]["fakes_per_real"] = 5
    torch.save(ckpt, tmp_path / "k5.ckpt")
    one, five = load_critic(path), load_critic(tmp_path / "k5.ckpt")
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([10, 300, 900])
    (l1, g1), (l5, g5) = one.logit_and_grad(x, t), five.logit_and_grad(x, t)
    torch.testing.assert_close(l5, l1 + math.log(5))
    torch.testing.assert_close(g5, g1)
