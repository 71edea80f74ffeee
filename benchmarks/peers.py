"""Peers and shared helpers for the benchmarks: diffusers' schedulers on our network, our recipes, result files.

Every sampler starts from the same per-sample noise (sample i depends only on (seed, i)) and
uses the same posterior-mean network. ``benchmarks/sampler_claims.py`` runs the peer comparison
(every diffusers solver on every grid it offers against our recipes, in three feature spaces);
``benchmarks/denoiser_quality.py`` uses the same runners to compare networks.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bdiff.metrics.report import markdown_table
from bdiff.metrics.samples_file import SampleSet
from bdiff.sampling.recipe import Recipe
from bdiff.sampling.sampler import SampleResult

SCHED = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


GRIDS = ("leading", "linspace", "trailing", "karras")
"""Every timestep grid diffusers offers: its three ``timestep_spacing`` values and ``use_karras_sigmas``."""


def diffusers_scheduler(name: str, grid: str = "trailing"):
    """A fresh diffusers scheduler on one of :data:`GRIDS`; a ``-karras`` suffix on ``name`` means ``grid="karras"``."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    base, karras = name.removesuffix("-karras"), name.endswith("-karras") or grid == "karras"
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; known: {', '.join(GRIDS)}")
    spacing = {"use_karras_sigmas": True} if karras else {"timestep_spacing": grid}
    if base == "diffusers-ddim" and not karras:
        return DDIMScheduler(**SCHED, clip_sample=False, set_alpha_to_one=True, **spacing)
    if base == "diffusers-dpm++2m":
        return DPMSolverMultistepScheduler(**SCHED, algorithm_type="dpmsolver++", solver_order=2, **spacing)
    if base == "diffusers-unipc":
        return UniPCMultistepScheduler(**SCHED, **spacing)
    if base == "diffusers-ddpm" and not karras:
        return DDPMScheduler(**SCHED, clip_sample=False, **spacing)
    raise ValueError(name)


def set_diffusers_timesteps(sched, steps: int, grid: list[int] | None) -> None:
    """``steps`` timesteps as the scheduler spaces them, or exactly ``grid`` (descending train timesteps).

    DPMSolverMultistepScheduler takes custom timesteps itself. UniPC's set_timesteps does not,
    so we set its ``timesteps`` and ``sigmas`` (sqrt((1-a)/a) at each, then 0) as its own
    set_timesteps does for a grid it chose; on the trailing grid this reproduces its FD exactly.
    """
    if grid is None:
        sched.set_timesteps(steps)
    elif "timesteps" in inspect.signature(sched.set_timesteps).parameters:
        sched.set_timesteps(timesteps=list(grid))
    else:
        sched.set_timesteps(len(grid))
        ac = sched.alphas_cumprod.double()
        sigmas = ((1 - ac) / ac).sqrt()[torch.tensor(grid)].float()
        sched.timesteps = torch.tensor(grid, dtype=torch.long)
        sched.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])


@torch.no_grad()
def run_diffusers(name: str, steps: int, denoiser, x_T: torch.Tensor, seed: int, batch: int,
                  grid: list[int] | None = None, spacing: str = "trailing") -> SampleSet:
    """Sample with a diffusers scheduler (on its ``spacing`` grid, or on explicit timesteps ``grid``);
    model output = our posterior-mean eps."""
    out = []
    start = time.perf_counter()
    for lo in range(0, len(x_T), batch):
        sched = diffusers_scheduler(name, spacing)  # stateful: a fresh one per run
        set_diffusers_timesteps(sched, steps, grid)
        x = x_T[lo : lo + batch].clone()
        gen = torch.Generator().manual_seed(seed + lo)
        for t in sched.timesteps:
            eps = denoiser.predict(x, torch.full((len(x),), int(t), dtype=torch.long)).eps
            kwargs = {"generator": gen} if name == "diffusers-ddpm" else {}
            x = sched.step(eps, t, x, **kwargs).prev_sample
        out.append(x.clamp(-1, 1))
    seconds = time.perf_counter() - start
    images = (torch.cat(out) + 1) / 2
    config = {"sampler": name, "steps": steps, "grid": grid, "spacing": spacing}
    return SampleSet(images, None, float(len(sched.timesteps)), seconds, config)


def run_ours(recipe: Recipe, denoiser, n: int, seed: int, batch: int,
             on_chunk: Callable[[SampleResult], None] | None = None) -> SampleSet:
    """``n`` samples with ``recipe`` in chunks of ``batch``; ``on_chunk`` sees each chunk's full result (extras)."""
    sampler = recipe.build(denoiser)
    images, variances, nfe = [], [], []
    start = time.perf_counter()
    for _, r in sampler.sample_chunks(n, batch, seed=seed):
        if on_chunk is not None:
            on_chunk(r)
        images.append(r.images)
        variances.append(r.variance)
        nfe.append(r.nfe.float())
    seconds = time.perf_counter() - start
    images01 = (torch.cat(images) + 1) / 2
    return SampleSet(images01, torch.cat(variances) / 4, float(torch.cat(nfe).mean()), seconds, recipe.as_dict())


def parse_run(item: str) -> tuple[str, Path, list[int]]:
    """``label=checkpoint:seed[,seed...]`` (a ``--run`` argument) -> (label, checkpoint, sampling seeds)."""
    label, _, rest = item.partition("=")
    path, _, seeds = rest.rpartition(":")
    if not label or not path or not seeds:
        raise SystemExit(f"--run {item!r}: expected label=checkpoint:seed[,seed...]")
    return label, Path(path), [int(s) for s in seeds.split(",")]


def write_results(out: Path, stem: str, payload: object, rows: list[dict], columns: list[str]) -> None:
    """Write ``<stem>.json`` (payload) and ``<stem>.md`` (a table of rows) into ``out``; print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str))
    table = markdown_table(rows, columns)
    (out / f"{stem}.md").write_text(table + "\n")
    print(table)
