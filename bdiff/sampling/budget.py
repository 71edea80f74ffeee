"""The sampler recipe for a budget of denoiser calls per sample (``bdiff-sample --nfe N``).

:data:`BEST_RECIPES` holds one recipe per listed budget, all UniPC (Zhao et al. 2023, bh1 or bh2 as
named; diffusers' option names) without a critic (it needs one trained for the checkpoint) and
without epsilon scaling:

* 3 and 6 calls: bh1 of order 2 on a timestep grid fitted to the checkpoint
  (:mod:`bdiff.sampling.fitted_grid`: fitted once per loaded checkpoint, ~1 min on 2 CPU cores);
* 5 calls: bh2 of order 3 up to the last step (``lower_order_final: False``) on the fitted grid,
  which also chooses its first timestep;
* 10 calls: bh2 of order 2 on the fitted grid started at T-1 (``late_start: False``);
* 20 calls: bh1 of order 2 on diffusers' ``leading`` grid.

Another budget N takes the entry of the largest listed budget <= N (the smallest for N below all of
them) with its steps set to N, except the budgets in :data:`FEWER_CALLS`, which run
a smaller entry as it is, in fewer calls than N. Named recipes stay available with ``--sampler FILE``.

The entries come from ``benchmarks/sampler_claims.py`` (a recipe replaces an entry only if it measures
better in every feature space), the :data:`FEWER_CALLS` budgets from ``benchmarks/budgets_between.py``,
and the bar they are compared with, the best diffusers configuration per feature space, from
``benchmarks/peer_bar.py``. The measurements, and how far each result holds across training runs and
sampling seeds, are in BENCHMARKS.md, section "Sampler quality at 5, 10 and 20 NFE"; the protocol in
docs/nfe_recipes.md.
"""

from __future__ import annotations

import copy
from typing import Any

from bdiff.checks import as_integer
from bdiff.sampling.recipe import Recipe, load_recipe


def _unipc(steps: int, grid: dict[str, Any], **options: Any) -> dict[str, Any]:
    return {"stepper": {"class_path": "bdiff.sampling.UniPC", "init_args": options}, "steps": steps, "grid": grid}


_FITTED = {"class_path": "bdiff.sampling.grids.FittedGrid"}
BEST_RECIPES: dict[int, dict[str, Any]] = {
    3: _unipc(3, _FITTED, variant="bh1"),
    5: _unipc(5, _FITTED, variant="bh2", order=3, lower_order_final=False),
    6: _unipc(6, _FITTED, variant="bh1"),
    10: _unipc(10, {**_FITTED, "init_args": {"late_start": False}}, variant="bh2"),
    20: _unipc(20, {"class_path": "bdiff.sampling.grids.ScheduleGrid", "init_args": {"spacing": "leading"}},
               variant="bh1"),
}
"""{budget: recipe file contents}, the recipe :func:`recipe_for_budget` runs at that budget (module docstring)."""

FEWER_CALLS: dict[int, int] = {11: 10, 12: 10, 15: 10, 16: 10, 19: 10}
"""{budget N: listed budget b < N}: ``--nfe N`` runs b's entry as it is (b calls) rather than stretched to N
steps, where the shorter run measures better in every feature space (module docstring)."""


def recipe_for_budget(nfe: int, posterior_samples: int = 8) -> Recipe:
    """The measured-best :class:`Recipe` for at most ``nfe`` sequential denoiser calls per sample (ValueError if < 1),
    with ``posterior_samples`` weight samples per prediction. It may take fewer calls (:data:`FEWER_CALLS`)."""
    as_integer("the budget (--nfe, denoiser calls per sample)", nfe, 1)
    if nfe in FEWER_CALLS:
        budget = steps = FEWER_CALLS[nfe]
    else:
        budget, steps = max((b for b in BEST_RECIPES if b <= nfe), default=min(BEST_RECIPES)), nfe
    spec = {**copy.deepcopy(BEST_RECIPES[budget]), "steps": steps, "posterior_samples": posterior_samples}
    return load_recipe(spec, name=f"best-at-{nfe}-nfe")
