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
them) with its steps and ``max_nfe`` set to N, except the budgets in :data:`FEWER_CALLS`, which run
a smaller entry as it is, in fewer calls than N. Named recipes stay available with ``--config``.

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
"""{budget: recipe dict}, the recipe :func:`recipe_for_budget` runs at that budget (module docstring)."""

FEWER_CALLS: dict[int, int] = {11: 10, 12: 10, 15: 10, 16: 10, 19: 10}
"""{budget N: listed budget b < N}: ``--nfe N`` runs b's entry as it is (b calls) rather than stretched to N
steps. On the fitted grids sample quality is not monotone in the number of steps; a budget is listed where
the shorter run measures better than the stretched one in every feature space (module docstring)."""


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
