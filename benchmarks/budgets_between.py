"""What ``--nfe N`` runs between the measured budgets: each candidate entry at every N in a range.

    python benchmarks/budgets_between.py --run A=runs/cos0/bdiff/6m7k765u/checkpoints/last.ckpt:1 --nfe 5 6 7 8 9 10
    python benchmarks/budgets_between.py --run A=... --nfe 3 4 12 15 18 --stem budgets_between_more

:data:`bdiff.sampling.budget.BEST_RECIPES` lists a few budgets (the sampler claims measure 5, 10 and 20
denoiser calls); any other budget N takes the entry of the largest listed budget <= N with N steps. A recipe that wins at 5
calls need not at 8 (UniPC of order 3 to the last step, the 5-NFE winner of the twelfth session,
read 6x the FD of order 2 at 10 calls on the fitted grid), so this runs each candidate entry (the
``--nfe`` table's own and :data:`CANDIDATES`) at every N on the choose cell of the sampler claims
(BENCHMARKS.md's rules: settings are chosen there), and prints FD per feature space for each,
with the recipe ``--nfe N`` runs now marked. Writes ``benchmarks/results/<stem>.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import parse_run, run_ours, write_results  # noqa: E402
from sampler_claims import RESULTS, Run, score_row  # noqa: E402

from bdiff.evaluate import references_for  # noqa: E402
from bdiff.sampling.budget import BEST_RECIPES, recipe_for_budget, rescale  # noqa: E402
from bdiff.sampling.recipe import Recipe  # noqa: E402

FITTED = {"name": "fitted"}
CANDIDATES: dict[str, dict[str, Any]] = {
    "unipc bh1, fitted": {"stepper": {"name": "unipc", "variant": "bh1"}, "spacing": FITTED},
    "unipc-3 bh1, fitted": {"stepper": {"name": "unipc", "variant": "bh1", "order": 3}, "spacing": FITTED},
    "unipc-3 bh2 to the end, fitted": {
        "stepper": {"name": "unipc", "variant": "bh2", "order": 3, "lower_order_final": False}, "spacing": FITTED},
    "unipc, fitted from T-1": {"stepper": "unipc", "spacing": {"name": "fitted", "late_start": False}},
    "unipc bh1, leading": {"stepper": {"name": "unipc", "variant": "bh1"}, "spacing": {"name": "leading"}},
}
"""Recipes (without ``steps``) tried at every budget: the 5-, 10- and 20-NFE entries of the sessions and their rivals."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="label=checkpoint:seed (the choose cell)")
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 6, 7, 8, 9, 10])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stem", default="budgets_between")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    label, ckpt, seeds = parse_run(args.run)
    run, references = Run(label, ckpt), references_for()
    rows = []
    for nfe in args.nfe:
        entry = recipe_for_budget(nfe).as_dict()
        for name, spec in CANDIDATES.items():
            recipe = Recipe.from_dict(rescale(spec, nfe), name=name)
            for seed in seeds:
                samples = run_ours(recipe, run.denoiser, args.n, seed, 1000)
                is_entry = (recipe.stepper, recipe.spacing) == (entry["stepper"], entry["spacing"])
                row = {"run": label, "seed": seed, "nfe": nfe, "recipe": name + (" (the --nfe entry)" if is_entry else ""),
                       **{k: v for k, v in score_row(samples.images, references, {}).items() if k.endswith("/fd")}}
                print(row, flush=True)
                rows.append(row)
    payload = {"run": args.run, "n": args.n, "best_recipes": BEST_RECIPES, "rows": rows}
    write_results(RESULTS, args.stem, payload, rows, ["run", "seed", "nfe", "recipe", *(f"{s}/fd" for s in references)])


if __name__ == "__main__":
    main()
