"""Steppers and the sampler loop against diffusers' schedulers on identical inputs."""

from __future__ import annotations

import pytest
import torch

from bdiff.denoiser import Prediction
from bdiff.sampling import DDIM, DDPM, DPMSolverPP2M, Sampler, SamplerCallback, StepContext, Tracked, UniPC, sample
from bdiff.sampling.noise import NoiseSource
from bdiff.sampling.steppers import Memory
from bdiff.schedule import NoiseSchedule, karras_timesteps

SCHED = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


class ToyDenoiser:
    """eps_hat(x, t) = tanh(x) * (0.5 + t/2000): smooth, x- and t-dependent, known everywhere."""

    image_shape = (1, 4, 4)

    def __init__(self) -> None:
        self.schedule = NoiseSchedule("linear")

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * (0.5 + t.float() / 2000).reshape(-1, 1, 1, 1)

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> Prediction:
        return Prediction(self.eps(x, t), torch.zeros_like(x), torch.ones_like(x))


def one_step(stepper, x, t: int, s: int, z=None) -> torch.Tensor:
    """One ``Stepper.step`` from a sample's first step (empty memory), as the Sampler takes it."""
    sched = NoiseSchedule("linear")
    tt = torch.full((x.shape[0],), t)
    x0 = sched.eps_to_x0(x, tt, ToyDenoiser().eps(x, tt))
    ctx = StepContext.between(sched, tt, torch.full_like(tt, s), torch.full_like(tt, -1))
    zero = torch.zeros_like(x)
    noise = lambda rows: z * rows.reshape(-1, 1, 1, 1) if z is not None else zero  # noqa: E731
    return stepper.step(Tracked(x, zero), Tracked(x0, zero), ctx, stepper.memory(x), noise)[0].value


@pytest.mark.parametrize("steps", [10, 50])
def test_ddpm_step_matches_diffusers(steps: int) -> None:
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(**SCHED, clip_sample=False, variance_type="fixed_small", timestep_spacing="trailing")
    ref.set_timesteps(steps)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for t in ref.timesteps.tolist()[:3] + ref.timesteps.tolist()[-2:]:
        s = t - 1000 // steps
        g = torch.Generator().manual_seed(t)
        expected = ref.step(ToyDenoiser().eps(x, torch.full((3,), t)), t, x, generator=g).prev_sample
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
        ours = one_step(DDPM(), x, t, s if s >= 0 else -1, z=z)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(eta: float) -> None:
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(**SCHED, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    ref.set_timesteps(10)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    z = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    for t in ref.timesteps.tolist():
        s = t - 100
        expected = ref.step(ToyDenoiser().eps(x, torch.full((3,), t)), t, x, eta=eta, variance_noise=z).prev_sample
        ours = one_step(DDIM(eta), x, t, s if s >= 0 else -1, z=z)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def _diffusers_loop(ref, den: ToyDenoiser, x: torch.Tensor, **step_kwargs) -> torch.Tensor:
    for t in ref.timesteps:
        x = ref.step(den.eps(x, torch.full((x.shape[0],), int(t))), t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("steps", [2, 5, 10, 20])
def test_sampler_with_dpmpp_2m_matches_diffusers(steps: int) -> None:
    from diffusers import DPMSolverMultistepScheduler

    ref = DPMSolverMultistepScheduler(
        **SCHED, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        lower_order_final=True, final_sigmas_type="zero", timestep_spacing="trailing",
    )
    ref.set_timesteps(steps)
    den = ToyDenoiser()
    noise = NoiseSource(0, range(3))
    x_T = noise.draw((1, 4, 4))
    ours = Sampler(den, DPMSolverPP2M(), steps).run(x_T, noise).x
    torch.testing.assert_close(ours, _diffusers_loop(ref, den, x_T.clone()), rtol=1e-4, atol=1e-4)


def _unipc_reference(steps: int, solver_type: str, final: str, order: int = 2, lower_order_final: bool = True):
    """diffusers' UniPC (data prediction, trailing grid) set to ``steps``, the toy denoiser, noise and x_T."""
    from diffusers import UniPCMultistepScheduler

    ref = UniPCMultistepScheduler(**SCHED, solver_order=order, solver_type=solver_type, predict_x0=True,
                                  lower_order_final=lower_order_final, final_sigmas_type=final,
                                  timestep_spacing="trailing")
    ref.set_timesteps(steps)
    noise = NoiseSource(0, range(3))
    return ref, ToyDenoiser(), noise, noise.draw((1, 4, 4))


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 20])
def test_sampler_with_unipc_matches_diffusers(steps: int) -> None:
    ref, den, noise, x_T = _unipc_reference(steps, "bh2", "zero")
    state = Sampler(den, UniPC(), steps).run(x_T, noise)
    expected = _diffusers_loop(ref, den, x_T.clone())
    torch.testing.assert_close(state.x, expected, rtol=1e-4, atol=1e-4)
    assert state.nfe.tolist() == [steps] * 3  # the corrector reuses the next step's model call
    if steps >= 3:  # the corrector matters: DPM-Solver++(2M) alone (UniPC's predictor) lands elsewhere
        plain = Sampler(den, DPMSolverPP2M(), steps).run(x_T, noise).x
        assert (plain - expected).abs().max() > 1e-3


def _unipc_matches_diffusers_up_to_the_final_step(steps: int, variant: str, order: int,
                                                   lower_order_final: bool = True) -> torch.Tensor:
    """Our UniPC against diffusers' run to sigma_min (only the final step differs; ours ends with the x0
    estimate), step for step; returns our final images."""
    from bdiff.sampler_callbacks import Recorder

    ref, den, noise, x_T = _unipc_reference(steps, variant, "sigma_min", order, lower_order_final)
    expected, x = [], x_T.clone()
    for t in ref.timesteps:
        x = ref.step(den.eps(x, torch.full((3,), int(t))), t, x).prev_sample
        expected.append(x)
    stepper = UniPC(variant, order, lower_order_final)
    state = Sampler(den, stepper, steps, callbacks=[Recorder(keys=("x",), max_samples=3)]).run(x_T, noise)
    (recorded,) = state.outputs.values()
    ours = [record["x"] for record in recorded.records]  # x_t at the start of each step
    assert len(ours) == steps and state.nfe.tolist() == [steps] * 3
    for step, (mine, theirs) in enumerate(zip(ours[1:], expected[:-1])):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4, msg=lambda m: f"after step {step}: {m}")
    assert torch.isfinite(state.x).all()
    return state.x


@pytest.mark.parametrize("steps", [2, 3, 5, 10, 20])
def test_unipc_bh1_matches_diffusers_up_to_its_final_step(steps: int) -> None:
    """bh1 step for step as diffusers' (whose bh1 is NaN with a final sigma of zero, so it runs to sigma_min),
    and away from bh2's."""
    bh1 = _unipc_matches_diffusers_up_to_the_final_step(steps, "bh1", 2)
    if steps >= 3:
        noise = NoiseSource(0, range(3))
        bh2 = Sampler(ToyDenoiser(), UniPC(), steps).run(noise.draw((1, 4, 4)), noise).x
        assert (bh2 - bh1).abs().max() > 1e-4


@pytest.mark.parametrize("lower_order_final", [True, False], ids=["lower_order_final", "order_3_to_the_end"])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("steps", [3, 4, 6, 10, 20])
def test_unipc_order_3_matches_diffusers_up_to_its_final_step(variant: str, steps: int, lower_order_final: bool) -> None:
    """UniP-3 and UniC-3 step for step as diffusers' ``solver_order=3`` (with ``lower_order_final`` the step
    before the last is of order 2), and away from order 2."""
    third = _unipc_matches_diffusers_up_to_the_final_step(steps, variant, 3, lower_order_final)
    if steps >= 4 + lower_order_final:  # the third step is the first of order 3; its correction shows from the fourth
        noise = NoiseSource(0, range(3))
        second = Sampler(ToyDenoiser(), UniPC(variant), steps).run(noise.draw((1, 4, 4)), noise).x
        assert (second - third).abs().max() > 1e-4


def test_unipc_refuses_an_unknown_order_and_a_memory_it_cannot_step_with() -> None:
    with pytest.raises(ValueError, match="order"):
        UniPC(order=4)
    with pytest.raises(ValueError, match="lower_order_final must be true or false"):
        UniPC(order=3, lower_order_final="false")
    x = Tracked(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4))
    t = torch.tensor([500, 500])
    ctx = StepContext.between(NoiseSchedule("linear"), t, t - 100, t - 200)
    third = UniPC(order=3)
    with pytest.raises(ValueError, match="keeps 3 earlier steps in a UniPCMemory but got a UniPCMemory of 2"):
        third.step(x, x, ctx, UniPC().memory(x.value), lambda rows: x.value)
    with pytest.raises(ValueError, match="got a Memory of 1"):
        UniPC().step(x, x, ctx, DPMSolverPP2M().memory(x.value), lambda rows: x.value)
    third.step(x, x, ctx, third.memory(x.value), lambda rows: x.value)


def test_unipc_refuses_an_unknown_variant() -> None:
    with pytest.raises(ValueError, match="bh1"):
        UniPC("bh3")


def test_unipc_first_order_corrector_weights() -> None:
    c_now, (c_t, c_p) = UniPC().corrector(torch.tensor([0.5], dtype=torch.float64),
                                          torch.tensor([[0.1], [float("nan")]], dtype=torch.float64), torch.tensor([1]))
    assert c_p.item() == 0 and c_now.item() == pytest.approx(-c_t.item()) and c_now.item() != 0


class _ShrinkX0(SamplerCallback):
    """Edits every prediction after the model call: x0 -> 0.8 x0."""

    def after_prediction(self, state, sampler) -> None:
        sampler.replace_x0(state, 0.8 * state.x0, state.active)


class _ShrunkDenoiser(ToyDenoiser):
    """The same edit made inside the model: what a diffusers scheduler would receive."""

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> Prediction:
        x0 = 0.8 * self.schedule.eps_to_x0(x, t, self.eps(x, t))
        return Prediction(self.schedule.x0_to_eps(x, t, x0), torch.zeros_like(x), torch.ones_like(x))


@pytest.mark.parametrize("stepper", [DPMSolverPP2M(), UniPC(), UniPC("bh1", 3)], ids=["dpmpp_2m", "unipc", "unipc3"])
def test_steppers_see_predictions_as_callbacks_left_them(stepper) -> None:
    noise = NoiseSource(0, range(3))
    x_T = noise.draw((1, 4, 4))
    edited = Sampler(ToyDenoiser(), stepper, 6, [_ShrinkX0()]).run(x_T, noise).x
    inside = Sampler(_ShrunkDenoiser(), stepper, 6).run(x_T, noise).x
    torch.testing.assert_close(edited, inside, rtol=1e-4, atol=1e-4)


class _Nothing(SamplerCallback):
    """A callback that changes nothing: the Sampler then runs its own loop rather than the product loop."""


@pytest.mark.parametrize("stepper", [DDPM(), DDIM(0.5), DPMSolverPP2M(), UniPC(), UniPC("bh1", 3)],
                         ids=["ddpm", "ddim", "dpmpp_2m", "unipc", "unipc3"])
def test_the_product_loop_and_the_callback_sampler_take_the_same_steps(stepper) -> None:
    def start() -> tuple[torch.Tensor, NoiseSource]:  # x_T drawn from the streams, as Sampler.sample does
        noise = NoiseSource(0, range(3))
        return noise.draw((1, 4, 4)), noise

    den = ToyDenoiser()
    grid = Sampler(den, stepper, 6).grid[:-1].tolist()
    looped = sample(den, stepper, grid, *start())
    state = Sampler(den, stepper, 6, [_Nothing()]).run(*start())
    assert torch.equal(looped.value, state.x) and torch.equal(looped.amp, state.amp)
    result = Sampler(den, stepper, 6).sample(3, seed=0)  # no callbacks: the product loop
    assert torch.equal(result.images, state.x.clamp(-1, 1)) and result.nfe.tolist() == [6] * 3


class _PinCorner(SamplerCallback):
    """Replaces one pixel of every proposed x_next by itself (same value, marked edited)."""

    def after_update(self, state, sampler) -> None:
        rows = state.active.nonzero().squeeze(1)
        pixels = torch.zeros_like(state.x_next[rows], dtype=torch.bool)
        pixels[:, :, 0, 0] = True
        sampler.replace_x_next(state, rows, state.x_next[rows].clone(), pixels)


def test_the_corrector_skips_exactly_the_pixels_a_callback_marked_edited() -> None:
    """Marked pixels are left uncorrected even when the callback wrote the same value back; the rest are not."""
    den, noise = ToyDenoiser(), NoiseSource(0, range(3))
    x_T = noise.draw((1, 4, 4))
    plain = Sampler(den, UniPC(), 6, [_Nothing()]).run(x_T, NoiseSource(0, range(3))).x
    pinned = Sampler(den, UniPC(), 6, [_PinCorner()]).run(x_T, NoiseSource(0, range(3))).x
    assert (pinned[:, :, 0, 0] - plain[:, :, 0, 0]).abs().max() > 1e-4
    dpm = Sampler(den, DPMSolverPP2M(), 6, [_PinCorner()]).run(x_T, NoiseSource(0, range(3))).x
    assert torch.equal(dpm, Sampler(den, DPMSolverPP2M(), 6).run(x_T, NoiseSource(0, range(3))).x)  # no corrector


@pytest.mark.parametrize("steps", [1, 4, 10, 25])
def test_sampler_with_ddim_matches_diffusers(steps: int) -> None:
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(**SCHED, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    ref.set_timesteps(steps)
    den = ToyDenoiser()
    noise = NoiseSource(0, range(3))
    x_T = noise.draw((1, 4, 4))
    state = Sampler(den, DDIM(), steps).run(x_T, noise)
    torch.testing.assert_close(state.x, _diffusers_loop(ref, den, x_T.clone(), eta=0.0), rtol=1e-4, atol=1e-4)
    assert state.nfe.tolist() == [steps] * 3


@pytest.mark.parametrize("steps", [1, 5, 10, 25])
def test_karras_grid_matches_diffusers_karras_sigmas(steps: int) -> None:
    from diffusers import DPMSolverMultistepScheduler

    ref = DPMSolverMultistepScheduler(**SCHED, algorithm_type="dpmsolver++", use_karras_sigmas=True)
    ref.set_timesteps(steps)
    sampler = Sampler(ToyDenoiser(), DDIM(), steps, spacing="karras")
    assert sampler.grid.tolist() == ref.timesteps.tolist() + [-1]
    assert karras_timesteps(NoiseSchedule("linear").alphas_cumprod, steps) == ref.timesteps.tolist()


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 5, 10, 25])
def test_every_diffusers_timestep_spacing_matches_its_multistep_grid(spacing: str, steps: int) -> None:
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    for cls in (DPMSolverMultistepScheduler, UniPCMultistepScheduler):
        ref = cls(**SCHED, timestep_spacing=spacing)
        ref.set_timesteps(steps)
        assert Sampler(ToyDenoiser(), DDIM(), steps, spacing=spacing).grid.tolist() == ref.timesteps.tolist() + [-1]


def test_leading_grid_sampler_matches_diffusers_unipc() -> None:
    from diffusers import UniPCMultistepScheduler

    ref = UniPCMultistepScheduler(**SCHED, timestep_spacing="leading")
    ref.set_timesteps(5)
    den = ToyDenoiser()
    noise = NoiseSource(0, range(3))
    x_T = noise.draw((1, 4, 4))
    ours = Sampler(den, UniPC(), 5, spacing="leading").run(x_T, noise).x
    torch.testing.assert_close(ours, _diffusers_loop(ref, den, x_T.clone()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rho", [3.0, 5.0])
def test_sampler_on_a_karras_grid_matches_diffusers_on_the_same_timesteps(rho: float) -> None:
    from diffusers import DPMSolverMultistepScheduler

    den = ToyDenoiser()
    grid = karras_timesteps(den.schedule.alphas_cumprod, 8, rho)
    assert grid[0] == 999 and grid[-1] == 0 and grid == sorted(set(grid), reverse=True)
    ref = DPMSolverMultistepScheduler(
        **SCHED, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True, final_sigmas_type="zero"
    )
    ref.set_timesteps(timesteps=grid)
    noise = NoiseSource(0, range(3))
    x_T = noise.draw((1, 4, 4))
    ours = Sampler(den, DPMSolverPP2M(), 8, spacing="karras", rho=rho).run(x_T, noise).x
    torch.testing.assert_close(ours, _diffusers_loop(ref, den, x_T.clone()), rtol=1e-4, atol=1e-4)
    # a smaller rho puts more of the grid at high noise
    assert karras_timesteps(den.schedule.alphas_cumprod, 8, 3.0)[4] > karras_timesteps(den.schedule.alphas_cumprod, 8, 7.0)[4]


def test_bad_spacing_is_refused_before_sampling() -> None:
    with pytest.raises(ValueError, match="spacing must be one of"):
        Sampler(ToyDenoiser(), DDIM(), 5, spacing="cosine")
    for rho in (0.0, -1.0, 1e-3, 1e17, float("nan"), float("inf"), True, "7"):
        with pytest.raises(ValueError, match="rho"):
            Sampler(ToyDenoiser(), DDIM(), 5, spacing="karras", rho=rho)
    cosine = ToyDenoiser()
    cosine.schedule = NoiseSchedule("cosine")  # sigma_max ~ 3e4: ten Karras steps crowd into t ~ 999
    with pytest.raises(ValueError, match="repeats timesteps.*fewer steps or spacing 'trailing'"):
        Sampler(cosine, DDIM(), 10, spacing="karras")


def test_samples_depend_only_on_seed_and_index() -> None:
    den = ToyDenoiser()
    sampler = Sampler(den, DDPM(), 10)
    whole = sampler.sample(6, seed=3).images
    part = sampler.sample(2, seed=3, first_index=4).images
    torch.testing.assert_close(whole[4:], part)
    assert not torch.allclose(sampler.sample(2, seed=4, first_index=4).images, part)


def test_bad_sampler_arguments() -> None:
    with pytest.raises(ValueError, match="steps"):
        Sampler(ToyDenoiser(), DDIM(), 0)
    with pytest.raises(ValueError, match="eta"):
        DDIM(-1.0)
    with pytest.raises(ValueError, match="n must be"):
        Sampler(ToyDenoiser(), DDIM(), 5).sample(0)


@pytest.mark.parametrize("stepper", [DDPM(), DDIM(0.5), DPMSolverPP2M(), UniPC(), UniPC(order=3)],
                         ids=["ddpm", "ddim", "dpmpp_2m", "unipc", "unipc3"])
def test_a_step_is_a_pure_function_and_the_sampler_keeps_no_job_state(stepper) -> None:
    """Stepper.step leaves its inputs and memory as they were and gives the same output twice;
    Sampler.run stores nothing on the Sampler (one Sampler can serve several jobs)."""
    g = torch.Generator().manual_seed(0)
    x, x0 = (Tracked(torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)) for _ in range(2))
    sched = NoiseSchedule("linear")

    def ctx(t: list[int], s: list[int]) -> StepContext:  # no step is the one before the last
        return StepContext.between(sched, torch.tensor(t), torch.tensor(s), torch.tensor([600, 200, 0]))

    noise = lambda rows: torch.ones_like(x.value)  # noqa: E731
    memory = stepper.step(x, x0, ctx([999, 700, 300], [900, 500, 100]), stepper.memory(x.value), noise)[1]
    inputs = [v.clone() for v in (*x, *x0)]
    kept = {k: v.clone() for k, v in vars(memory).items()}
    first, second = (stepper.step(x, x0, ctx([900, 500, 100], [700, 300, -1]), memory, noise) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(inputs, (*x, *x0)))
    assert all(torch.equal(v.nan_to_num(), getattr(memory, k).nan_to_num()) for k, v in kept.items())
    assert all(torch.equal(a, b) for a, b in zip(first[0], second[0]))
    assert isinstance(first[1], Memory)
    sampler = Sampler(ToyDenoiser(), stepper, 4)
    before = dict(vars(sampler))
    sampler.run(torch.randn(2, 1, 4, 4, generator=g), NoiseSource(0, [0, 1]))
    assert vars(sampler).keys() == before.keys() and all(vars(sampler)[k] is v for k, v in before.items())
