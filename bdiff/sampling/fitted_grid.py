"""A timestep grid fitted to one denoiser: the K-step grid whose summed local errors are smallest.

Fixed grids (diffusers' leading / linspace / trailing, Karras sigmas) place the same steps for
every model. Following GITS (Chen et al. 2024, "On the Trajectory Regularity of ODE-based
Diffusion Sampling", ICML), a few *teacher* trajectories of the probability-flow ODE are solved
finely once; the cost of one coarse step from candidate timestep t_i to t_j is the mean distance
between where a DDIM step from the teacher's x_{t_i} (with the denoiser's x0 estimate there)
lands and the teacher's own x_{t_j}; dynamic programming then picks the K-step path from the
start to the clean image with the smallest summed cost. With ``late_start`` the path may also
begin below T-1, taking x_T ~ N(0, I) as x_{t_s} (what diffusers' ``leading`` grid does at a fixed
t_s); that costs the distance between x_T and the teacher's x_{t_s}, and no denoiser call.

Written here because no maintained library fits a grid to an arbitrary model: diffusers ships
only the fixed "Align Your Steps" lists for Stable Diffusion-size models.

The teacher is DPM-Solver++(2M) (our own stepper, :mod:`bdiff.sampling.steppers`) on every
``stride // 2``-th timestep, from ``samples`` starting noises of its own random stream (not a
sampling seed); the candidate timesteps are every ``stride``-th one from T-1. The costs are the fit's
artefact: :func:`fit_step_costs` writes them to a cache keyed by the weights' content hash
(:func:`cache_dir`), so a fitted grid for another K, or the same checkpoint in another process, is the
dynamic programme alone. A fit costs ``samples`` x T / (``stride`` / 2)
image denoisings: 45-90 s for the default digits model on 2 CPU cores (seconds on a GPU).
"""

from __future__ import annotations

import hashlib
import logging
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bdiff.cache import cache_root
from bdiff.checks import as_integer
from bdiff.denoiser import Denoiser
from bdiff.files import atomic_file
from bdiff.sampling.noise import NoiseSource
from bdiff.sampling.sampler import Sampler, SamplerCallback
from bdiff.sampling.state import SamplerState
from bdiff.sampling.steppers import DPMSolverPP2M

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # bump when the teacher or the cost changes: cached costs of another version are not read
TEACHER_STREAM = 2**31 - 7
"""Seed of the teacher's starting noises: a stream no sampling seed a user is likely to pick draws from."""


@dataclass(frozen=True)
class StepCosts:
    """The local errors of coarse steps between candidate timesteps (what :func:`optimal_grid` minimises).

    timesteps: the M candidate timesteps, descending, the first T-1.
    step: (M+1, M+1) float64; ``step[i, j]`` (i < j) is the mean distance of a DDIM step from
        candidate i to candidate j (j = M: the clean image) to the teacher's state there; inf for i >= j.
    start: (M,) float64; the cost of starting at candidate s with x_T (0 for s = 0, the teacher's start).
    """

    timesteps: tuple[int, ...]
    step: np.ndarray
    start: np.ndarray


class _KeepNodes(SamplerCallback):
    """Keeps x_t and the x0 estimate of every sample whenever the sampler is at one of ``timesteps``."""

    def __init__(self, timesteps: set[int]) -> None:
        self.timesteps, self.x, self.x0 = timesteps, {}, {}

    def after_prediction(self, state: SamplerState, sampler: Sampler) -> None:
        t = int(state.t[0])
        if t in self.timesteps:
            self.x[t], self.x0[t] = state.x.float().clone(), state.x0.float().clone()


def step_costs(denoiser: Denoiser, samples: int = 256, stride: int = 10, teacher_stride: int | None = None) -> StepCosts:
    """Solve ``samples`` teacher trajectories (every ``teacher_stride``-th timestep, default ``stride // 2``)
    and tabulate the cost of every coarse step between every ``stride``-th timestep (module docstring)."""
    samples, stride = as_integer("fitted grid: samples", samples, 2), as_integer("fitted grid: stride", stride, 2)
    teacher_stride = as_integer("fitted grid: teacher_stride", teacher_stride or max(1, stride // 2), 1)
    ac = denoiser.schedule.alphas_cumprod.detach().to("cpu", torch.float64)
    last = len(ac) - 1
    candidates = list(range(last, -1, -stride))
    teacher_grid = sorted(set(range(last, -1, -teacher_stride)) | set(candidates), reverse=True)
    keep = _KeepNodes(set(candidates))
    teacher = Sampler(denoiser, DPMSolverPP2M(), len(teacher_grid), [keep], timesteps=teacher_grid)
    params = denoiser.parameters() if isinstance(denoiser, torch.nn.Module) else iter(())
    device = next((p.device for p in params), torch.device("cpu"))
    noise = NoiseSource(TEACHER_STREAM, range(samples))
    x_T = noise.draw(tuple(denoiser.image_shape), device=device)
    start_time = time.perf_counter()
    final = teacher.run(x_T, noise).x.float()
    log.info("fitted grid: %d teacher trajectories of %d steps in %.1f s", samples, len(teacher_grid),
             time.perf_counter() - start_time)

    def distance(a: Tensor, b: Tensor) -> float:
        return float((a - b).flatten(1).norm(dim=1).mean())

    m = len(candidates)
    targets = [keep.x[t] for t in candidates] + [final]
    alpha = [float(ac[t]) for t in candidates] + [1.0]
    step = np.full((m + 1, m + 1), np.inf)
    for i, t in enumerate(candidates):
        x, x0 = keep.x[t], keep.x0[t]
        eps = (x - alpha[i] ** 0.5 * x0) / (1 - alpha[i]) ** 0.5
        for j in range(i + 1, m + 1):  # DDIM (Song et al. 2021, eq. 12, eta = 0) from t_i to t_j
            landed = alpha[j] ** 0.5 * x0 + (1 - alpha[j]) ** 0.5 * eps
            step[i, j] = distance(landed, targets[j])
    start = np.array([distance(x_T.float(), keep.x[t]) for t in candidates])
    start[0] = 0.0
    return StepCosts(tuple(candidates), step, start)


def optimal_grid(costs: StepCosts, steps: int, late_start: bool = True) -> list[int]:
    """The ``steps`` descending timesteps (one denoiser call each) whose path to the clean image has the
    least summed cost; with ``late_start`` the first may lie below T-1 (module docstring).

    Dynamic programming over (steps taken, candidate): O(steps M^2). ValueError if there are
    fewer candidates than steps.
    """
    steps = as_integer("fitted grid: steps", steps, 1)
    m = len(costs.timesteps)
    if steps > m:
        raise ValueError(f"a fitted grid of {steps} steps needs at least as many candidate timesteps; "
                         f"there are {m} (use a smaller stride)")
    best = np.full((steps + 1, m + 1), np.inf)  # best[k, j]: least cost to reach candidate j having taken k steps
    came_from = np.zeros((steps + 1, m + 1), dtype=int)
    best[0, :m] = costs.start if late_start else np.where(np.arange(m) == 0, 0.0, np.inf)
    for k in range(1, steps + 1):
        for j in range(1, m + 1):
            total = best[k - 1, :j] + costs.step[:j, j]
            came_from[k, j] = int(np.argmin(total))
            best[k, j] = total[came_from[k, j]]
    path = [m]
    for k in range(steps, 0, -1):
        path.append(came_from[k, path[-1]])
    return [costs.timesteps[i] for i in reversed(path[1:])]


def content_key(denoiser: Denoiser) -> str | None:
    """A hash of what the denoiser computes: its class, predictive settings and state dict (None for a
    denoiser that is not an ``nn.Module``). The same checkpoint loaded twice gets the same key."""
    if not isinstance(denoiser, torch.nn.Module):
        return None
    digest = hashlib.sha1(repr((type(denoiser).__qualname__, getattr(denoiser, "num_samples", None),
                                getattr(denoiser, "mode", None), CACHE_VERSION)).encode())
    for name, value in denoiser.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().to("cpu").reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where fitted costs persist between processes: ``$BDIFF_CACHE/fitted_grids`` if ``BDIFF_CACHE`` is set,
    else ``~/.cache/bdiff/fitted_grids`` (the feature networks' cache sits beside it)."""
    return cache_root() / "fitted_grids"


def _load(path: Path) -> StepCosts | None:
    """Costs saved by :func:`_save`, or None if the file is missing or unreadable (then they are refitted)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return StepCosts(tuple(int(t) for t in f["timesteps"]), f["step"].copy(), f["start"].copy())
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if path.exists():
            log.warning("fitted grid: ignoring unreadable cache file %s (%s)", path, e)
        return None


def _save(costs: StepCosts, path: Path) -> None:
    """Write ``costs`` to ``path`` atomically (a partial file never replaces a good one); a read-only cache is skipped."""
    try:
        with atomic_file(path) as f:
            np.savez(f, timesteps=np.array(costs.timesteps), step=costs.step, start=costs.start)
    except OSError as e:
        log.warning("fitted grid: could not cache the costs in %s (%s)", path.parent, e)


def fit_step_costs(denoiser: Denoiser, samples: int = 256, stride: int = 10) -> StepCosts:
    """The denoiser's step costs (:func:`step_costs`), read from the cache (:func:`cache_dir`, keyed by
    :func:`content_key`, ``samples`` and ``stride``) or computed and written there. A denoiser that is not an
    ``nn.Module`` has no key: its costs are computed every time."""
    key = content_key(denoiser)
    if key is None:
        return step_costs(denoiser, samples, stride)
    path = cache_dir() / f"{key}-{samples}-{stride}.npz"
    costs = _load(path)
    if costs is None:
        costs = step_costs(denoiser, samples, stride)
        _save(costs, path)
    return costs
