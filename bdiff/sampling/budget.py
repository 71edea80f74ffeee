"""The measured-best sampler recipe for a budget of denoiser calls per sample (``bdiff-sample --nfe N``).

:data:`BEST_RECIPES` holds one recipe per measured budget, chosen by ``benchmarks/sampler_claims.py``
under BENCHMARKS.md's rules (how far each holds, per feature space: its section "Sampler claims").
The choose run (training seed 0, sampling seed 1) picked: at 5 NFE, UniPC of order 3 (bh2) to the
last step (no second-order step before it) on a timestep grid *fitted to the checkpoint*
(:mod:`bdiff.sampling.fitted_grid`; fitted once per loaded checkpoint, ~1 min on 2 CPU cores) with
the fit's own start; at 10 NFE, UniPC (bh2, order 2) on the fitted grid started at T-1; at 20 NFE,
UniPC bh1 on diffusers' ``leading`` grid. The bar is the best diffusers configuration per feature
space, among every solver, grid and option diffusers offers (``benchmarks/peer_bar.py``): against
it the 5-NFE entry is 0.28-0.58x on the report cells (met), the 10-NFE entry 0.73-1.11x and the
20-NFE one 0.97-1.17x (missed). No entry has a critic: it needs one trained for the checkpoint. An
entry is replaced only by a recipe that beats it in every feature space on the choose cell (the
issue's definition of a win): epsilon scaling (:mod:`bdiff.sampling.eps_scaling`) traded one space
for another against these entries, or led by 1-2%, which the report cells reversed, so it is in
none of them.

Another budget N takes the entry of the largest listed budget <= N (the smallest for N below it)
with its steps and ``max_nfe`` set to N, except the budgets in :data:`FEWER_CALLS`, which run that
entry as it is, with fewer calls than N. The 3- and 6-call entries (UniPC bh1, order 2, on the
fitted grid: the 5-NFE entry before the twelfth session) are there because the order-3 recipe wins
at 5 calls only: on the choose cell it loses to it at 3 calls in every space, at 4 and 6 in one or
two, and reads 2-4x its FD from 7 to 10 (``benchmarks/budgets_between.py``). From 11 to 19 calls
the 20-NFE entry (UniPC bh1, leading grid) beat the 10-NFE one, stretched or not, in every space at no budget.
Named recipes stay available with ``--config``.
"""

from __future__ import annotations

import copy
from typing import Any

from bdiff.checks import as_integer
from bdiff.sampling.recipe import Recipe

_UNIPC_BH1_FITTED: dict[str, Any] = {"stepper": {"name": "unipc", "variant": "bh1"}, "spacing": {"name": "fitted"}}

BEST_RECIPES: dict[int, dict[str, Any]] = {
    3: {**_UNIPC_BH1_FITTED, "steps": 3},
    5: {"stepper": {"name": "unipc", "variant": "bh2", "order": 3, "lower_order_final": False}, "steps": 5,
        "spacing": {"name": "fitted"}},
    6: {**_UNIPC_BH1_FITTED, "steps": 6},
    10: {"stepper": "unipc", "steps": 10, "spacing": {"name": "fitted", "late_start": False}},
    20: {"stepper": {"name": "unipc", "variant": "bh1"}, "steps": 20, "spacing": {"name": "leading"}},
}
"""{budget: recipe dict}; see the module docstring for where each entry comes from."""

FEWER_CALLS: dict[int, int] = {11: 10, 12: 10, 15: 10, 16: 10, 19: 10}
"""{budget N: listed budget b < N} where ``--nfe N`` runs b's entry as it is (b calls) rather than stretched to N
steps: on the fitted grids FD is not monotone in the number of steps. Over the choose cell and the four report
cells, the 10-call entry read 0.54-0.87x the digits FD of itself stretched to 11-19 steps, 0.73-1.02x its MLP FD
and 0.95-1.07x its pixel FD (``benchmarks/budgets_between.py``; BENCHMARKS.md, "Budgets between the measured
ones"). A budget is here where the shorter run beat the stretched one in every feature space on the choose cell
and no report cell, nor the third training run (run C), reversed that in every space. The stretched entry stays
at 13, 14, 17 and 18 (on the choose cell the shorter run read 0.4-2.7% higher pixel FD) and at 7 and 8, where
the 6-call entry as it is won on the choose cell but read 1.15-1.55x the stretched entry's FD in every space on
run C (and 1.04-1.13x on run B, sampling seed 2, at 8)."""


def rescale(spec: dict[str, Any], nfe: int) -> dict[str, Any]:
    """``spec`` for a budget of ``nfe`` calls: ``nfe`` solver steps, every ``max_nfe`` set to ``nfe``."""
    out = copy.deepcopy(spec)
    out["steps"] = nfe
    for callback in out.get("callbacks", []):
        if "max_nfe" in callback:
            callback["max_nfe"] = nfe
    return out


def recipe_for_budget(nfe: int, posterior_samples: int = 8) -> Recipe:
    """The measured-best :class:`Recipe` for at most ``nfe`` sequential denoiser calls per sample (ValueError if < 1),
    with ``posterior_samples`` weight samples per prediction. It may take fewer calls (:data:`FEWER_CALLS`)."""
    as_integer("the budget (--nfe, denoiser calls per sample)", nfe, 1)
    if nfe in FEWER_CALLS:
        budget = steps = FEWER_CALLS[nfe]
    else:
        budget, steps = max((b for b in BEST_RECIPES if b <= nfe), default=min(BEST_RECIPES)), nfe
    spec = {**rescale(BEST_RECIPES[budget], steps), "posterior_samples": posterior_samples}
    return Recipe.from_dict(spec, name=f"best-at-{nfe}-nfe")
