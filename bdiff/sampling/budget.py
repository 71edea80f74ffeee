"""The measured-best sampler recipe for a budget of denoiser calls per sample (``bdiff-sample --nfe N``).

:data:`BEST_RECIPES` holds one recipe per measured budget, chosen by ``benchmarks/sampler_claims.py``
under BENCHMARKS.md's rules (how far each holds, per feature space: its section "Sampler claims"):
5 NFE is UniPC with per-sample step sizes from the posterior variance (tolerance 0.25); at 10 and
20 NFE no choice held on the report runs, so the entry is plain UniPC on diffusers' default
``linspace`` grid, picked a priori. No entry has a critic (none beat the same budget without one).
The entries were chosen on the fp32 default before the 10-minute one; on the current default the
5-NFE entry no longer beats the best peer (BENCHMARKS.md), pending a new choose run.
Another budget N takes the entry of the largest measured budget <= N (the smallest for N below
it) with its steps and ``max_nfe`` set to N. Named recipes stay available with ``--config``.
"""

from __future__ import annotations

import copy
from typing import Any

from bdiff.checks import as_integer
from bdiff.sampling.recipe import Recipe

BEST_RECIPES: dict[int, dict[str, Any]] = {
    5: {"stepper": "unipc", "steps": 5, "callbacks": [{"name": "adaptive", "tol": 0.25, "max_nfe": 5}]},
    10: {"stepper": "unipc", "steps": 10, "spacing": "linspace"},
    20: {"stepper": "unipc", "steps": 20, "spacing": "linspace"},
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
