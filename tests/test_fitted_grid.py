"""A timestep grid fitted to the denoiser (GITS-style dynamic programming): optimal, valid, cached, and better."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from bdiff.denoiser import Prediction
from bdiff.sampling import DDIM, Sampler, UniPC
from bdiff.sampling import fitted_grid
from bdiff.sampling.fitted_grid import StepCosts, optimal_grid
from bdiff.sampling.grids import FittedGrid
from bdiff.sampling.recipe import load_recipe
from bdiff.schedule import NoiseSchedule, grid_timesteps


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fitted costs persist under $BDIFF_CACHE: a fresh one per test."""
    monkeypatch.setenv("BDIFF_CACHE", str(tmp_path / "cache"))


class GaussianDenoiser:
    """The exact denoiser for data ~ N(0, s^2 I): eps*(x_t, t) = sqrt(1-a) x_t / (a s^2 + 1 - a)."""

    image_shape = (1, 4, 4)

    def __init__(self, s: float = 0.5) -> None:
        self.schedule, self.s = NoiseSchedule("linear"), s

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> Prediction:
        a = self.schedule.alpha_bar(t, x)
        eps = ((1 - a).sqrt() * x / (a * self.s**2 + 1 - a)).to(x.dtype)
        return Prediction(eps, torch.zeros_like(x), torch.ones_like(x))


def brute_force(costs: StepCosts, steps: int, late_start: bool) -> float:
    """The least summed cost over every path of ``steps`` calls (the thing the dynamic programme finds)."""
    m, best = len(costs.timesteps), np.inf
    for path in itertools.combinations(range(m), steps):
        if not late_start and path[0] != 0:
            continue
        nodes = [*path, m]
        best = min(best, costs.start[path[0]] + sum(costs.step[i, j] for i, j in zip(nodes, nodes[1:])))
    return best


def path_cost(costs: StepCosts, grid: list[int]) -> float:
    nodes = [costs.timesteps.index(t) for t in grid] + [len(costs.timesteps)]
    return costs.start[nodes[0]] + sum(costs.step[i, j] for i, j in zip(nodes, nodes[1:]))


@pytest.mark.parametrize("late_start", [True, False])
def test_the_dynamic_programme_finds_the_cheapest_path(late_start: bool) -> None:
    rng = np.random.default_rng(0)
    m = 9
    step = np.triu(rng.uniform(0.1, 2.0, (m + 1, m + 1)), 1)
    step[step == 0] = np.inf
    costs = StepCosts(tuple(range(900, 0, -100)), step, np.r_[0.0, rng.uniform(0, 1, m - 1)])
    for steps in (1, 3, 5, 9):
        grid = optimal_grid(costs, steps, late_start)
        assert len(grid) == steps and grid == sorted(grid, reverse=True)
        assert path_cost(costs, grid) == pytest.approx(brute_force(costs, steps, late_start))
        if not late_start:
            assert grid[0] == 900
    with pytest.raises(ValueError, match="10 steps needs at least as many candidate timesteps"):
        optimal_grid(costs, 10)


def test_a_fitted_grid_lands_closer_to_the_ode_solution_than_fixed_grids() -> None:
    den = GaussianDenoiser()
    fine = Sampler(den, DDIM(), 500).sample(64, seed=3).images
    grid = FittedGrid(samples=64, stride=10).timesteps(den, 4)
    assert len(grid) == 4 and all(isinstance(t, int) and 0 <= t < 1000 for t in grid)

    def error(sampler: Sampler) -> float:
        return float((sampler.sample(64, seed=3).images - fine).pow(2).mean())

    fitted = error(Sampler(den, DDIM(), 4, timesteps=grid))
    for spacing in ("trailing", "leading", "linspace", "karras"):
        assert fitted < error(Sampler(den, DDIM(), 4, spacing=spacing)), spacing


def test_a_fitted_recipe_samples_on_its_grid_and_bad_options_are_refused() -> None:
    den = GaussianDenoiser()
    grid = {"class_path": "FittedGrid", "init_args": {"samples": 8, "stride": 50}}
    sampler = load_recipe({"stepper": "UniPC", "steps": 4, "grid": grid}).build(den)
    assert sampler.grid.tolist() == FittedGrid(samples=8, stride=50).timesteps(den, 4) + [-1]
    assert isinstance(sampler.stepper, UniPC) and int(sampler.sample(5, seed=0).nfe.max()) == 4
    for options, message in [({"rho": 7}, "rho"), ({"late_start": 3}, "late_start"), ({"samples": 1}, "samples"),
                             ({"stride": 0.5}, "stride")]:
        with pytest.raises(ValueError, match=message):
            load_recipe({"stepper": "UniPC", "steps": 4, "grid": {"class_path": "FittedGrid", "init_args": options}})


def test_an_explicit_grid_is_checked() -> None:
    den = GaussianDenoiser()
    assert Sampler(den, DDIM(), 3, timesteps=[900, 500, 20]).grid.tolist() == [900, 500, 20, -1]
    assert Sampler(den, DDIM(), 3, timesteps=grid_timesteps(den.schedule.alphas_cumprod, 3)).grid.tolist()[0] == 999
    for bad in ([900, 500], [900, 900, 20], [20, 500, 900], [1000, 500, 20], [900, 500.0, 20], "900"):
        with pytest.raises(ValueError, match="timesteps must be 3 strictly descending integers"):
            Sampler(den, DDIM(), 3, timesteps=bad)


def test_a_checkpoint_is_fitted_once_for_every_grid_of_it(last_ckpt, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One fit per (weights, predictive, samples, stride), on disk: other step counts, late_start, a second load or a
    new process read it; other weights or another predictive are fitted anew; a damaged file is refitted."""
    from bdiff.checkpoint import load_model

    calls = []
    real = fitted_grid.step_costs
    monkeypatch.setattr(fitted_grid, "step_costs", lambda *a: calls.append(a) or real(*a))
    grid = FittedGrid(samples=8, stride=50)
    first = grid.timesteps(load_model(last_ckpt, num_samples=2), 4)
    den = load_model(last_ckpt, num_samples=2)
    assert grid.timesteps(den, 4) == first and len(grid.timesteps(den, 6)) == 6
    assert FittedGrid(late_start=False, samples=8, stride=50).timesteps(den, 3)[0] == 999
    assert len(calls) == 1
    grid.timesteps(load_model(last_ckpt, num_samples=3), 4)  # another predictive: refitted
    assert len(calls) == 2
    saved = sorted((tmp_path / "cache" / "fitted_grids").glob("*.npz"))
    assert len(saved) == 2 and not list(saved[0].parent.glob("*.partial"))
    with torch.no_grad():
        next(den.parameters()).add_(0.5)  # other weights, changed in place: another key
    grid.timesteps(den, 4)
    assert len(calls) == 3
    for path in saved:
        path.write_bytes(b"not an npz file")  # a damaged cache is refitted and rewritten
    assert grid.timesteps(load_model(last_ckpt, num_samples=2), 4) == first
    assert len(calls) == 4


def test_a_denoiser_that_is_not_a_module_is_fitted_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = fitted_grid.step_costs
    monkeypatch.setattr(fitted_grid, "step_costs", lambda *a: calls.append(a) or real(*a))
    den = GaussianDenoiser()
    assert FittedGrid(samples=8, stride=50).timesteps(den, 3) == FittedGrid(samples=8, stride=50).timesteps(den, 3)
    assert len(calls) == 2 and fitted_grid.content_key(den) is None
