"""The measured-best sampler recipe for a budget of denoiser calls per sample (``bdiff-sample --nfe N``).

:data:`BEST_RECIPES` holds, per measured budget, the recipe that won ``benchmarks/sampler_claims.py``
(chosen on one training run and one sampling seed, reported on another run and two other seeds;
BENCHMARKS.md, "Sampler claims"), once without and once with a learned critic. A critic must be
trained against the same diffusion checkpoint, so the critic recipe is used only when the caller
passes one. For another budget N the entry for the largest measured budget <= N (or the smallest
one, for N below it) is rescaled to N: the solver steps change, the calls an extra pass reserves
stay, every hard limit (``max_nfe``) becomes N. Recipes also stay available by name
(``configs/sampler/*.yaml``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from bdiff.sampling.recipe import Recipe

def _adaptive(nfe: int, tol: float) -> dict[str, Any]:
    return {"name": "adaptive", "tol": tol, "max_nfe": nfe}


_CRITIC = {"name": "critic", "critic": None, "weight": 2.0, "t_range": [0, 999], "threshold": 1.0, "retries": 0}

BEST_RECIPES: dict[int, dict[str, dict[str, Any]]] = {
    5: {"without_critic": {"stepper": "unipc", "steps": 5, "callbacks": [_adaptive(5, 0.25)]},
        "with_critic": {"stepper": "unipc", "steps": 5, "spacing": "leading", "callbacks": [dict(_CRITIC)]}},
    10: {"without_critic": {"stepper": "unipc", "steps": 10, "callbacks": [_adaptive(10, 0.2)]},
         "with_critic": {"stepper": "unipc", "steps": 10, "callbacks": [_adaptive(10, 0.2), dict(_CRITIC)]}},
    20: {"without_critic": {"stepper": "unipc", "steps": 20, "callbacks": [_adaptive(20, 0.15)]},
         "with_critic": {"stepper": "unipc", "steps": 20, "callbacks": [_adaptive(20, 0.15), dict(_CRITIC)]}},
}
"""{budget: {"without_critic": recipe dict, "with_critic": recipe dict}}: the winners of
``benchmarks/sampler_claims.py choose`` (``benchmarks/results/sampler_claims_choice.json``). UniPC with
posterior-variance step control, its tolerance tuned per budget. On the default digits model no
critic recipe beat the same budget without one; the ``with_critic`` entries are the best measured
with a critic, for a user who has trained one (its ``critic`` path is filled in by
:func:`recipe_for_budget`)."""


def rescale(spec: dict[str, Any], budget: int, nfe: int) -> dict[str, Any]:
    """``spec`` (measured at ``budget`` calls per sample) for a budget of ``nfe``: the same reserve for extra
    passes, every ``max_nfe`` set to ``nfe`` (those hard limits are what keeps a recipe within its budget)."""
    out = copy.deepcopy(spec)
    reserve = budget - spec["steps"]
    out["steps"] = max(1, nfe - reserve)
    for callback in out.get("callbacks", []):
        if "max_nfe" in callback:
            callback["max_nfe"] = nfe
    return out


def recipe_for_budget(nfe: int, critic: str | Path | None = None) -> Recipe:
    """The measured-best :class:`Recipe` for at most ``nfe`` sequential denoiser calls per sample.

    ``critic``: a critic checkpoint trained against the model to sample (then the best recipe with a
    critic is used; without one, the best recipe without). ValueError for ``nfe`` < 1.
    """
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"the budget (--nfe) must be an integer >= 1 denoiser calls per sample, got {nfe!r}")
    measured = sorted(BEST_RECIPES)
    budget = max((b for b in measured if b <= nfe), default=measured[0])
    key = "with_critic" if critic is not None else "without_critic"
    spec = rescale(BEST_RECIPES[budget][key], budget, nfe)
    for callback in spec.get("callbacks", []):
        if callback.get("name") == "critic":
            callback["critic"] = str(critic)
    return Recipe.from_dict(spec, name=f"best-at-{nfe}-nfe" + ("-with-critic" if critic is not None else ""))
