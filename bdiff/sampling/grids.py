"""Timestep grids a recipe names: one of the schedule's (:func:`~bdiff.schedule.grid_timesteps`) or one fitted to
the denoiser (:mod:`bdiff.sampling.fitted_grid`)."""

from __future__ import annotations

from bdiff.checks import as_integer
from bdiff.denoiser import Denoiser
from bdiff.sampling.fitted_grid import StepCosts, fit_step_costs, optimal_grid
from bdiff.schedule import SPACINGS, check_rho, grid_timesteps


class Grid:
    """Where a sampler's steps lie: :meth:`timesteps` gives ``steps`` descending integer timesteps for a denoiser."""

    def timesteps(self, denoiser: Denoiser, steps: int) -> list[int]:
        raise NotImplementedError


class ScheduleGrid(Grid):
    """A fixed grid: ``trailing`` (uniform from T-1, DDIM's), ``leading`` or ``linspace`` (diffusers' spacings),
    or ``karras`` (Karras et al. 2022 noise levels with exponent ``rho``)."""

    def __init__(self, spacing: str = "trailing", rho: float = 7.0) -> None:
        if spacing not in SPACINGS:
            raise ValueError(f"grid spacing must be one of {list(SPACINGS)}, got {spacing!r}")
        self.spacing, self.rho = spacing, check_rho(rho)

    def timesteps(self, denoiser: Denoiser, steps: int) -> list[int]:
        return grid_timesteps(denoiser.schedule.alphas_cumprod, steps, self.spacing, self.rho)


class FittedGrid(Grid):
    """The grid fitted to the denoiser (GITS-style dynamic programme over teacher trajectories,
    :mod:`bdiff.sampling.fitted_grid`). :meth:`fit` computes the step costs once per checkpoint and caches
    them; :meth:`timesteps` reads them (fitting first if they are not cached).

    Args:
        late_start: the grid may start below T-1 (x_T taken as x_{t_start}).
        samples: teacher trajectories.
        stride: candidate timesteps every ``stride`` steps from T-1.
    """

    def __init__(self, late_start: bool = True, samples: int = 256, stride: int = 10) -> None:
        if not isinstance(late_start, bool):
            raise ValueError(f"fitted grid late_start must be true or false, got {late_start!r}")
        self.late_start = late_start
        self.samples, self.stride = as_integer("fitted grid samples", samples, 2), as_integer("fitted grid stride", stride, 2)

    def fit(self, denoiser: Denoiser) -> StepCosts:
        """The denoiser's step costs, from the cache or fitted now (and cached)."""
        return fit_step_costs(denoiser, self.samples, self.stride)

    def timesteps(self, denoiser: Denoiser, steps: int) -> list[int]:
        return optimal_grid(self.fit(denoiser), steps, self.late_start)
