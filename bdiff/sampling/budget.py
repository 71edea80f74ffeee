"""The measured-best sampler recipe for a budget of denoiser calls per sample (``bdiff-sample --nfe N``).

:data:`BEST_RECIPES` holds one recipe per measured budget, chosen by ``benchmarks/sampler_claims.py``
under BENCHMARKS.md's rules (how far each holds, per feature space: its section "Sampler claims").
On the current (10-minute) default the choose run (training seed 0, sampling seed 1) picked, at
5 and 10 NFE, UniPC on a timestep grid *fitted to the checkpoint* (:mod:`bdiff.sampling.fitted_grid`;
fitted once per loaded checkpoint, ~1 min on 2 CPU cores): 0.48 / 0.48 / 0.60x the best diffusers
peer (digits / MLP / pixel features) at 5 NFE with the fit's own start (t = 789 there), 0.43 /
0.79 / 0.65x at 10 NFE with the grid starting at T-1. At 20 NFE nothing of ours beat the best
peer's configuration in every space (the fitted grid 1.07x in its worst space; every 20-step
ODE solution sits near the ODE's own FD), so that entry is the peer's: DPM-Solver++(2M) on
diffusers' ``leading`` grid (1.04x). No entry has a critic: it needs one trained for the
checkpoint. An entry is replaced only by a recipe that beats it in every feature space on the
choose cell (the issue's definition of a win): epsilon scaling (:mod:`bdiff.sampling.eps_scaling`)
had the lowest worst-space ratio there at every budget, but traded one space for another against
these entries (or led by 1-2%, which the report cells reversed), so none of them changed.
Another budget N takes the entry of the largest measured budget <= N (the smallest for N below
it) with its steps and ``max_nfe`` set to N. Named recipes stay available with ``--config``.
"""

from __future__ import annotations

import copy
from typing import Any

from bdiff.checks import as_integer
from bdiff.sampling.recipe import Recipe

BEST_RECIPES: dict[int, dict[str, Any]] = {
    5: {"stepper": "unipc", "steps": 5, "spacing": {"name": "fitted"}},
    10: {"stepper": "unipc", "steps": 10, "spacing": {"name": "fitted", "late_start": False}},
    20: {"stepper": "dpmpp_2m", "steps": 20, "spacing": "leading"},
}
"""{budget: recipe dict}; see the module docstring for where each entry comes from."""


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
    with ``posterior_samples`` weight samples per prediction."""
    as_integer("the budget (--nfe, denoiser calls per sample)", nfe, 1)
    budget = max((b for b in BEST_RECIPES if b <= nfe), default=min(BEST_RECIPES))
    spec = {**rescale(BEST_RECIPES[budget], nfe), "posterior_samples": posterior_samples}
    return Recipe.from_dict(spec, name=f"best-at-{nfe}-nfe")
