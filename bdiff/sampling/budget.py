"""The measured-best sampler recipe for a budget of denoiser calls per sample (``bdiff-sample --nfe N``).

:data:`BEST_RECIPES` holds one recipe per measured budget, chosen by ``benchmarks/sampler_claims.py``
under BENCHMARKS.md's rules (how far each holds, per feature space: its section "Sampler claims").
On the current (10-minute) default no uncertainty-driven recipe beat the best diffusers peer in
every feature space, so every entry is plain UniPC: at 5 NFE on diffusers' ``leading`` grid (the
best peer on the choose run; rechosen on the current default, where the earlier adaptive-steps
entry read 1.24x the peer in its worst space and 1.43-1.93x on the report runs), at 10 and 20 NFE
on ``linspace`` (picked a priori when no choice held on the earlier default's report runs). The
critic's one-step correction came closest at 5 NFE (1.04-1.06x) but needs a critic trained for
the checkpoint, so no entry has one. Another budget N takes the entry of the largest measured
budget <= N (the smallest for N below it) with its steps and ``max_nfe`` set to N. Named recipes
stay available with ``--config``.
"""

from __future__ import annotations

import copy
from typing import Any

from bdiff.checks import as_integer
from bdiff.sampling.recipe import Recipe

BEST_RECIPES: dict[int, dict[str, Any]] = {
    5: {"stepper": "unipc", "steps": 5, "spacing": "leading"},
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
