"""What the training-time preview (:class:`~bdiff.lit.callbacks.SampleGrid`) can afford to draw.

A preview of N samples with S DDIM steps and an uncertainty map from K posterior chains makes
S calls of the posterior-mean denoiser on N images and S calls of the chains denoiser on K*N
images. With per-image costs measured by one timed call of each (:func:`measure_cost`) the
estimate is

    seconds = S * N * (mean_per_image + K * chain_per_image)          (:func:`preview_seconds`)

By default a preview may cost ``max_fraction`` (10%) of the training wall time so far, less
what earlier previews of the run already took, and never less than ``min_seconds`` (60 s):
:func:`preview_budget`. When the estimate is over, :func:`plan_preview` shrinks the preview in
this order, each move repeated while the estimate is still over the budget:

1. halve the chains, down to 4 (8 -> 4);
2. the propagated uncertainty map instead of chains (no extra denoiser call:
   :func:`bdiff.sampling.ddim_sample_and_variance`);
3. halve the steps, down to 20;
4. halve the samples, down to 16;
5. halve the steps, down to ``min_steps`` (10);
6. halve the samples, down to ``min_samples`` (4).

No step goes below what was configured (a configured 5-step preview stays at 5). If even the
smallest preview is over the budget it is drawn anyway and the line says so. Nothing here
imports Lightning; the arithmetic is checked in ``tests/test_preview_budget.py`` with made-up
costs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from bdiff.denoiser import Denoiser
from bdiff.sampling import SamplerCallback

Uncertainty = Literal["chains", "propagated", "none"]
MIN_CHAINS = 4  # fewer chains than this give a map too noisy to be worth its cost: propagate instead
STEPS_FIRST_FLOOR = 20
SAMPLES_FIRST_FLOOR = 16


@dataclass(frozen=True)
class PreviewCost:
    """Seconds of one denoiser call, per image: the posterior-mean denoiser, and the chains
    denoiser per image per chain (0 when no chains are drawn)."""

    mean_per_image: float
    chain_per_image: float = 0.0


@dataclass(frozen=True)
class PreviewPlan:
    """What a preview draws and what it should cost.

    Attributes:
        num_samples: N images.
        steps: DDIM steps.
        chains: K posterior chains for the uncertainty map (0 unless ``uncertainty == "chains"``).
        uncertainty: ``chains`` (variance over K chains), ``propagated`` (the sampler's propagated
            map, no extra calls) or ``none`` (a deterministic model).
        seconds: estimated cost (NaN when not estimated: no budget).
        budget: the budget in seconds, or None (no budget: what was configured is drawn).
        configured: (N, S, K) as configured, before any reduction.
    """

    num_samples: int
    steps: int
    chains: int
    uncertainty: Uncertainty
    seconds: float = math.nan
    budget: float | None = None
    configured: tuple[int, int, int] | None = None

    @property
    def reduced(self) -> bool:
        """True when the preview was made smaller than configured to fit the budget."""
        return self.configured is not None and (self.num_samples, self.steps, self.chains) != self.configured

    @property
    def over_budget(self) -> bool:
        """True when even this (smallest allowed) preview is estimated to take longer than the budget."""
        return self.budget is not None and self.seconds > self.budget

    def describe(self, what: str = "preview") -> str:
        """One line, e.g. ``preview: 64 samples x DDIM-50, uncertainty from 8 posterior chains (est. 12 s,
        budget 60 s)``."""
        maps = {
            "chains": f"uncertainty from {self.chains} posterior chains",
            "propagated": "propagated uncertainty map (no extra denoiser calls)",
            "none": "no uncertainty map (deterministic model)",
        }
        line = f"{what}: {self.num_samples} samples x DDIM-{self.steps}, {maps[self.uncertainty]}"
        if self.budget is not None:
            line += f" (est. {_seconds(self.seconds)}, budget {_seconds(self.budget)})"
        if self.reduced and self.configured is not None:
            n, s, k = self.configured
            line += f"; reduced from {n} x DDIM-{s}" + (f" x {k} chains" if k else "") + " to fit the budget"
        if self.over_budget:
            line += "; over the budget even at its smallest"
        if self.reduced or self.over_budget:
            line += " (SampleGrid options max_fraction, min_seconds, min_samples, min_steps change this)"
        return line


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"


def preview_seconds(num_samples: int, steps: int, chains: int, cost: PreviewCost) -> float:
    """Estimated seconds of a preview: steps * samples * (mean_per_image + chains * chain_per_image)."""
    return steps * num_samples * (cost.mean_per_image + chains * cost.chain_per_image)


def preview_budget(elapsed: float, spent: float, max_fraction: float | None, min_seconds: float) -> float | None:
    """Seconds the next preview may take: max(max_fraction * elapsed - spent, min_seconds); None without a fraction.

    ``elapsed``: training wall time so far (previews included); ``spent``: what earlier previews
    of this run took. So all previews together stay near ``max_fraction`` of the run.
    """
    if max_fraction is None:
        return None
    return max(max_fraction * elapsed - spent, min_seconds)


def plan_preview(
    num_samples: int,
    steps: int,
    chains: int,
    uncertainty: Uncertainty,
    cost: PreviewCost | None,
    budget: float | None,
    min_samples: int = 4,
    min_steps: int = 10,
) -> PreviewPlan:
    """The largest preview, in the module docstring's order, whose estimate fits ``budget``.

    Args:
        num_samples, steps, chains: the configured preview (chains are used only when
            ``uncertainty == "chains"``).
        uncertainty: the preferred map: ``chains``, ``propagated`` or ``none``.
        cost: per-image costs of one denoiser call (:func:`measure_cost`); may be None without a budget.
        budget: seconds, or None to draw what was configured.
        min_samples, min_steps: the smallest preview the reductions may reach (never above
            what was configured).
    """
    if uncertainty not in ("chains", "propagated", "none"):
        raise ValueError(f"uncertainty must be 'chains', 'propagated' or 'none', got {uncertainty!r}")
    k = chains if uncertainty == "chains" else 0
    plan = PreviewPlan(num_samples, steps, k, uncertainty, budget=budget, configured=(num_samples, steps, k))

    if budget is None:
        return plan
    if cost is None:
        raise ValueError("plan_preview needs the measured cost to fit a budget")

    def est(p: PreviewPlan) -> float:
        return preview_seconds(p.num_samples, p.steps, p.chains, cost)
    min_samples, min_steps = min(min_samples, num_samples), min(min_steps, steps)
    steps_floor = max(min_steps, min(STEPS_FIRST_FLOOR, steps))
    samples_floor = max(min_samples, min(SAMPLES_FIRST_FLOOR, num_samples))

    def halve(value: int, floor: int) -> int:
        return max(floor, value // 2)

    moves = [  # (can it move?, the move), in the module docstring's order
        (lambda p: p.uncertainty == "chains" and p.chains > MIN_CHAINS,
         lambda p: replace(p, chains=halve(p.chains, MIN_CHAINS))),
        (lambda p: p.uncertainty == "chains", lambda p: replace(p, chains=0, uncertainty="propagated")),
        (lambda p: p.steps > steps_floor, lambda p: replace(p, steps=halve(p.steps, steps_floor))),
        (lambda p: p.num_samples > samples_floor,
         lambda p: replace(p, num_samples=halve(p.num_samples, samples_floor))),
        (lambda p: p.steps > min_steps, lambda p: replace(p, steps=halve(p.steps, min_steps))),
        (lambda p: p.num_samples > min_samples, lambda p: replace(p, num_samples=halve(p.num_samples, min_samples))),
    ]
    for can, move in moves:
        while est(plan) > budget and can(plan):
            plan = move(plan)
    return replace(plan, seconds=est(plan))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_cost(denoiser: Denoiser, x_T: Tensor, chains: Denoiser | None = None, num_chains: int = 0) -> PreviewCost:
    """Per-image seconds of one denoiser call on the preview batch x_T (N,C,H,W), after a one-image warm-up.

    With ``chains`` (a chain-major denoiser of ``num_chains`` weight samples) its call on the
    N * num_chains batch is timed too. Each timed call is one step of the real preview.
    """
    n = x_T.shape[0]
    t = torch.full((n,), denoiser.schedule.timesteps - 1, device=x_T.device, dtype=torch.long)

    def seconds(d: Denoiser, x: Tensor, tt: Tensor, warm: Tensor, warm_t: Tensor) -> float:
        d.predict(warm, warm_t)
        _sync(x.device)
        start = time.perf_counter()
        d.predict(x, tt)
        _sync(x.device)
        return time.perf_counter() - start

    mean = seconds(denoiser, x_T, t, x_T[:1], t[:1]) / n
    chain = 0.0
    if chains is not None and num_chains > 0:
        xs, ts = x_T.repeat(num_chains, 1, 1, 1), t.repeat(num_chains)
        warm, warm_t = x_T[:1].repeat(num_chains, 1, 1, 1), t[:1].repeat(num_chains)
        chain = seconds(chains, xs, ts, warm, warm_t) / (n * num_chains)
    return PreviewCost(mean, chain)


class PreviewProgress(SamplerCallback):
    """Sampler callback that advances a tqdm bar by one after every reverse step."""

    name = "preview_progress"

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def after_update(self, state: Any, sampler: Any) -> None:
        self.bar.update(1)
