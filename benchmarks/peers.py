"""Peers and shared runners for the benchmarks: diffusers' schedulers on our network, and our recipes.

Every sampler starts from the same per-sample noise (sample i depends only on (seed, i)) and
uses the same posterior-mean network. ``benchmarks/sampler_claims.py`` runs the peer comparison
(every diffusers solver on every grid it offers against our recipes, in three feature spaces);
``benchmarks/denoiser_quality.py`` and ``benchmarks/fd_floor.py`` use the same runners (:func:`run_peer` for any
diffusers configuration, :class:`Peer`; :func:`run_ours` for our recipes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from bdiff.metrics.samples_file import SampleSet
from bdiff.sampling.recipe import Recipe
from bdiff.sampling.sampler import SampleResult

SCHED = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


GRIDS = ("leading", "linspace", "trailing", "karras")
"""Every timestep grid diffusers offers: its three ``timestep_spacing`` values and ``use_karras_sigmas``."""


FIRST_11_SOLVERS = {"diffusers-ddim": ("ddim", ""), "diffusers-dpm++2m": ("dpm++", ""), "diffusers-unipc": ("unipc", "bh2")}
"""The sampler claims' first 11 configurations are labelled "<one of these>, <grid>": {name: (solver, variant)},
order 2, diffusers' defaults otherwise (:meth:`Peer.from_label`)."""


@dataclass(frozen=True)
class Peer:
    """One diffusers scheduler configuration: a solver, a timestep grid and the solver's options.

    ``grid`` is a ``timestep_spacing`` (leading, linspace, trailing) or a sigma schedule
    (karras: rho 7; exponential; beta: Beta(0.6, 0.6) quantiles; lu: uniform in log-SNR, Lu et al.'s
    DPM-Solver grid, DPM-Solver++ only). ``clip`` clips every x0 prediction to the data range [-1, 1]
    (DDIM's ``clip_sample``, the other solvers' ``thresholding`` at ``sample_max_value`` 1, which is
    static clipping). ``order`` and ``variant`` are the multistep order and UniPC's B(h) (bh1, bh2).
    ``final`` is diffusers' ``final_sigmas_type``: the last step goes to sigma 0 (``zero``, the
    default) or to the schedule's smallest sigma (``sigma_min``, then the sample is that x).
    """

    solver: str
    grid: str
    order: int = 2
    variant: str = ""
    clip: bool = False
    final: str = "zero"

    @classmethod
    def from_label(cls, label: str) -> Peer:
        """The configuration a result row's ``sampler`` names: one of the first 11 by solver and grid
        (``"diffusers-unipc, leading"``, :data:`FIRST_11_SOLVERS`) or any other by its :attr:`label` after
        ``"diffusers "`` (``"diffusers unipc-3 bh1, leading, sigma_min"``). ValueError for anything else."""
        name, _, rest = label.partition(", ")
        if name in FIRST_11_SOLVERS:
            if label not in first_11():
                raise ValueError(f"{label!r} names none of the first 11 configurations (grids: {', '.join(GRIDS)}; "
                                 "DDIM has no Karras grid)")
            return first_11()[label]
        tokens = name.removeprefix("diffusers ").split(" ")
        variant = tokens.pop() if tokens[-1] in ("bh1", "bh2") else ""
        solver, _, order = " ".join(tokens).rpartition("-")
        grid, *flags = rest.split(", ")
        peer = cls(solver or "ddim", grid, int(order) if order.isdigit() else 2, variant, "clip" in flags,
                   "sigma_min" if "sigma_min" in flags else "zero")
        if not name.startswith("diffusers ") or f"diffusers {peer.label}" != label or peer not in _all_peer_set():
            raise ValueError(f"{label!r} names no diffusers configuration (e.g. 'diffusers-unipc, leading' or "
                             f"'diffusers unipc-3 bh1, leading, sigma_min')")
        return peer

    @property
    def label(self) -> str:
        """E.g. ``"unipc-3 bh1, karras, clip, sigma_min"``."""
        name = self.solver + (f"-{self.order}" if self.solver != "ddim" else "") + (f" {self.variant}" if self.variant else "")
        return f"{name}, {self.grid}" + (", clip" if self.clip else "") + (", sigma_min" if self.final != "zero" else "")

    def scheduler(self):
        """A fresh diffusers scheduler for this configuration (schedulers are stateful)."""
        from diffusers import (DDIMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                               DPMSolverSinglestepScheduler, UniPCMultistepScheduler)

        sigmas = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas",
                  "lu": "use_lu_lambdas"}
        grid = {sigmas[self.grid]: True} if self.grid in sigmas else {"timestep_spacing": self.grid}
        if self.solver == "ddim":
            return DDIMScheduler(**SCHED, clip_sample=self.clip, set_alpha_to_one=True, **grid)
        options = {"solver_order": self.order, "thresholding": self.clip, "sample_max_value": 1.0}
        if self.solver == "deis":  # no final_sigmas_type: its last sigma is sigma(t=0) on the spacings and, on the
            # sigma grids, the last sigma repeated (a zero-length final step: one of its N calls is spent for nothing)
            return DEISMultistepScheduler(**SCHED, **options, **grid)
        options["final_sigmas_type"] = self.final
        if self.solver == "dpm++":
            return DPMSolverMultistepScheduler(**SCHED, algorithm_type="dpmsolver++", **options, **grid)
        if self.solver == "dpm++ single":  # its grid is its own (no timestep_spacing)
            return DPMSolverSinglestepScheduler(**SCHED, algorithm_type="dpmsolver++", **options,
                                                **({} if self.grid == "linspace" else grid))
        if self.solver == "unipc":
            return UniPCMultistepScheduler(**SCHED, solver_type=self.variant or "bh2", **options, **grid)
        raise ValueError(f"unknown solver {self.solver!r}")


def all_peers() -> list[Peer]:
    """Every solver, grid and option of diffusers' deterministic schedulers that fits a budget of N calls in N steps.

    DDIM on its three spacings; DPM-Solver++ (multistep, orders 2 and 3, on all seven grids; single-step,
    orders 2 and 3, on its own grid and the three sigma schedules); UniPC (orders 2 and 3, B(h) bh1 and bh2)
    and DEIS (orders 2 and 3) on the six grids they offer; each with and without x0 clipping, and each
    that has the option with both final sigmas. UniPC's bh1 runs with ``sigma_min`` only: with a final
    sigma of zero its B(h) = h is infinite on the last step and every sample is NaN. Solvers that spend
    two calls per step (Heun) or add noise (DDPM, SDE variants) are left out: at these budgets they
    trail the multistep ODE solvers (``benchmarks/stochastic_vs_ode.py``). 190 configurations.
    """
    spacings, schedules = ("leading", "linspace", "trailing"), ("karras", "exponential", "beta")
    out = []
    for clip in (False, True):
        out += [Peer("ddim", g, clip=clip) for g in spacings]
        for order in (2, 3):
            out += [Peer("deis", g, order, clip=clip) for g in (*spacings, *schedules)]
            out += [Peer("unipc", g, order, "bh1", clip, "sigma_min") for g in (*spacings, *schedules)]
            for final in ("zero", "sigma_min"):
                out += [Peer("dpm++", g, order, clip=clip, final=final) for g in (*spacings, *schedules, "lu")]
                out += [Peer("dpm++ single", g, order, clip=clip, final=final) for g in ("linspace", *schedules)]
                out += [Peer("unipc", g, order, "bh2", clip, final) for g in (*spacings, *schedules)]
    return out


@cache
def _all_peer_set() -> frozenset[Peer]:
    """:func:`all_peers` as a set, built once."""
    return frozenset(all_peers())


def screened_peers() -> list[Peer]:
    """:func:`all_peers` without x0 clipping, the beta grid and DDIM: 76 configurations, affordable at 2,000 samples.

    On 500 samples of the choose cell (``peer_bar_all_n500``) the beta grid read 2.7-170x the best FD
    at every budget and DDIM, first order, 1.4-3.5x at 10 NFE. Clipping changed the median FD by 5% at
    5 NFE and under 1% above, but rescued some configurations at 5 NFE (DPM-Solver++(3M) on the
    log-SNR grid: 30 -> the best digits FD), so :func:`peer_bar.cell_rows` runs the clipped twin of
    every configuration at 5 NFE and of the leaders above.
    """
    return [p for p in all_peers() if not p.clip and p.grid != "beta" and p.solver != "ddim"]


@cache
def first_11() -> dict[str, Peer]:
    """The sampler claims' first 11 configurations by row label (``"diffusers-unipc, leading"``): each of
    :data:`FIRST_11_SOLVERS` on each of :data:`GRIDS` (DDIM has no Karras grid), order 2, no clipping."""
    return {f"{name}, {grid}": Peer(solver, grid, variant=variant) for name, (solver, variant) in FIRST_11_SOLVERS.items()
            for grid in GRIDS if not (solver == "ddim" and grid == "karras")}


def in_old_bar(peer: Peer) -> bool:
    """Whether ``peer`` is one of the sampler claims' first 11 configurations (:func:`first_11`)."""
    return peer in first_11().values()


def bar_from(rows: list[dict], top: int) -> dict[int, list[Peer]]:
    """{budget: the old bar's 11 configurations and, per feature space, the ``top`` best peers of ``rows`` at
    that budget} (``rows``: a ``benchmarks/peer_bar.py`` screen's, with a ``peer`` field each)."""
    rows = [r for r in rows if r["family"] == "peer"]
    spaces = sorted({k.split("/")[0] for k in rows[0] if k.endswith("/fd")})
    out = {}
    for nfe in sorted({r["budget"] for r in rows}):
        chosen = set(first_11().values())
        for space in spaces:
            ranked = sorted((r for r in rows if r["budget"] == nfe), key=lambda r: r[f"{space}/fd"])
            chosen.update(Peer(**r["peer"]) for r in ranked[:top])
        out[nfe] = sorted(chosen, key=lambda p: p.label)
    return out


@torch.no_grad()
def run_peer(peer: Peer, steps: int, denoiser, x_T: torch.Tensor, batch: int) -> SampleSet:
    """Sample with one :class:`Peer` configuration in ``steps`` denoiser calls (ValueError if it takes another
    number); model output = our posterior-mean eps."""
    out, calls = [], 0
    start = time.perf_counter()
    for lo in range(0, len(x_T), batch):
        sched = peer.scheduler()
        sched.set_timesteps(steps)
        x, calls = x_T[lo : lo + batch].clone(), 0
        for t in sched.timesteps:
            eps = denoiser.predict(x, torch.full((len(x),), int(t), dtype=torch.long)).eps
            x = sched.step(eps, t, x).prev_sample
            calls += 1
        if calls != steps:
            raise ValueError(f"{peer.label} made {calls} denoiser calls for {steps} steps")
        out.append(x.clamp(-1, 1))
    seconds = time.perf_counter() - start
    return SampleSet((torch.cat(out) + 1) / 2, None, float(calls), seconds, {"peer": peer.label, "steps": steps})


def diverged(samples: SampleSet) -> bool:
    """Whether any sample is NaN (some order-3 configurations blow up at few steps; they are no bar). :func:`run_peer`
    clamps images to [-1, 1], so an infinite sample reads as a saturated one (and a far FD), not as diverged."""
    return not bool(torch.isfinite(samples.images).all())


def run_ours(recipe: Recipe, denoiser, n: int, seed: int, batch: int,
             on_chunk: Callable[[SampleResult], None] | None = None) -> SampleSet:
    """``n`` samples with ``recipe`` in chunks of ``batch``; ``on_chunk`` sees each chunk's full result (outputs)."""
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
    return SampleSet(images01, torch.cat(variances) / 4, float(torch.cat(nfe).mean()), seconds, recipe.config)


def parse_run(item: str) -> tuple[str, Path, list[int]]:
    """``label=checkpoint:seed[,seed...]`` (a ``--run`` argument) -> (label, checkpoint, sampling seeds)."""
    label, _, rest = item.partition("=")
    path, _, seeds = rest.rpartition(":")
    if not label or not path or not seeds:
        raise SystemExit(f"--run {item!r}: expected label=checkpoint:seed[,seed...]")
    return label, Path(path), [int(s) for s in seeds.split(",")]
