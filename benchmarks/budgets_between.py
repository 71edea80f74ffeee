"""What ``--nfe N`` runs between the measured budgets: each candidate entry at every N in a range.

    python benchmarks/budgets_between.py --run A=runs/cos0/bdiff/6m7k765u/checkpoints/last.ckpt:1 --nfe 5 6 7 8 9 10
    python benchmarks/budgets_between.py --run A=... --nfe 3 4 12 15 18 --stem budgets_between_more
    python benchmarks/budgets_between.py --run A=...:0,2 B=...:0,2 --nfe 10 11 12 13 14 15 16 17 18 19 \
        --recipes "unipc, fitted from T-1" --stem budgets_between_report_10_19       # the report cells

:data:`bdiff.sampling.budget.BEST_RECIPES` lists a few budgets (the sampler claims measure 5, 10 and 20
denoiser calls); any other budget N takes the entry of the largest listed budget <= N, stretched to N
steps or, at the budgets of :data:`~bdiff.sampling.budget.FEWER_CALLS`, as it is. A recipe that wins
at 5 calls need not at 8 (UniPC of order 3 to the last step, the 5-NFE winner of the twelfth
session, read 6x the FD of order 2 at 10 calls on the fitted grid), and a fitted grid with more
steps need not do better, so this runs each candidate entry (the ``--nfe`` table's own and
:data:`CANDIDATES`) stretched to every N, on the choose cell of the sampler claims (BENCHMARKS.md's
rules: settings are chosen there) or on the report cells, and prints FD per feature space for
each, with the recipe ``--nfe N`` runs marked (none where it runs a shorter entry as it is: that
is the row at the shorter budget). Writes ``benchmarks/results/<stem>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from bdiff.sampling.budget import BEST_RECIPES, FEWER_CALLS, recipe_for_budget
from bdiff.sampling.recipe import load_recipe
from common import RESULTS, references_for, short_recipe, write_results
from peers import parse_run, run_ours
from sampler_claims import Run, score_row

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
CHOOSE_CELL = ("A", 1)
"""(run label, sampling seed) of the choose cell in the commands above (BENCHMARKS.md's rules)."""
ENTRY_MARK = " (the --nfe entry)"



def candidate(name: str, steps: int):
    """:data:`CANDIDATES` entry ``name`` as a Recipe of ``steps`` steps."""
    return short_recipe({**CANDIDATES[name], "steps": steps}, name=name)

def shorter_vs_stretched(rows: list[dict]) -> str:
    """Markdown: at each budget N between listed ones, FD of the lower listed entry run as it is (its own calls)
    over FD of it stretched to N steps, per space, on the choose cell and as a range over the other cells in
    ``rows`` (the report cells, or a third training run's), and how many calls ``--nfe N`` spends
    (:data:`~bdiff.sampling.budget.FEWER_CALLS`).

    rows: this script's rows (several files' together); a pair needs both the recipe's row at the listed
    budget b and at N, on the same cell. ``*`` marks a choose-cell ratio below 1 in every space (the shorter
    run wins there)."""
    spaces = [key.removesuffix("/fd") for key in rows[0] if key.endswith("/fd")]
    fd = {(r["run"], r["seed"], r["nfe"], r["recipe"].removesuffix(ENTRY_MARK)): r for r in rows}
    lines = ["| N | runs as is | recipe | choose cell (" + " / ".join(spaces) + ") | other cells (" + " / ".join(spaces)
             + ") | --nfe N runs |", "|---|---|---|---|---|---|"]
    for run, seed, nfe, name in sorted({k for k in fd if k[2] not in BEST_RECIPES}, key=lambda k: (k[2], k[3])):
        if (run, seed) != CHOOSE_CELL:
            continue
        shorter = max((b for b in BEST_RECIPES if b < nfe), default=None)
        if shorter is None or candidate(name, shorter).config != load_recipe(BEST_RECIPES[shorter]).config:
            continue  # only the entry --nfe runs at the shorter budget
        ratios = {cell: [fd[(*cell, shorter, name)][f"{s}/fd"] / fd[(*cell, nfe, name)][f"{s}/fd"] for s in spaces]
                  for cell in {k[:2] for k in fd} if (*cell, shorter, name) in fd and (*cell, nfe, name) in fd}
        if CHOOSE_CELL not in ratios:
            continue
        choose = ratios.pop(CHOOSE_CELL)
        others = " / ".join(f"{min(r[i] for r in ratios.values()):.3f}-{max(r[i] for r in ratios.values()):.3f}"
                            for i in range(len(spaces))) if ratios else "not run"
        runs = recipe_for_budget(nfe).steps
        lines.append(f"| {nfe} | {shorter} | {name} | {' / '.join(f'{v:.3f}' for v in choose)}"
                     f"{' *' if max(choose) < 1 else ''} | {others} | {runs} calls |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", nargs="+", help="label=checkpoint:seed[,seed...], one per training run "
                   "(the choose cell to choose; the report cells to report)")
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 6, 7, 8, 9, 10])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stem", default="budgets_between")
    p.add_argument("--recipes", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES),
                   help="the candidates to run (default: all)")
    p.add_argument("--summarise", nargs="+", metavar="STEM", help="sample nothing: write <stem>_shorter.md (stem: "
                   "--stem), the shorter entry as it is over itself stretched, from these stems' results")
    args = p.parse_args()
    if args.summarise:
        rows = [r for stem in args.summarise for r in json.loads((RESULTS / f"{stem}.json").read_text())["rows"]]
        if not rows:
            p.error(f"--summarise {' '.join(args.summarise)}: these results hold no rows")
        table = shorter_vs_stretched(rows)
        (RESULTS / f"{args.stem}_shorter.md").write_text(table + "\n")
        print(table)
        return
    if not args.run:
        p.error("--run is required unless --summarise is given")
    torch.set_num_threads(args.threads)
    references, rows = references_for(), []
    for label, ckpt, seeds in map(parse_run, args.run):
        run = Run(label, ckpt)
        for nfe in args.nfe:
            entry = recipe_for_budget(nfe).config
            for name in args.recipes:
                recipe = candidate(name, nfe)
                is_entry = all(recipe.config[k] == entry[k] for k in ("stepper", "grid", "steps"))
                for seed in seeds:
                    samples = run_ours(recipe, run.denoiser, args.n, seed, 1000)
                    row = {"run": label, "seed": seed, "nfe": nfe, "recipe": name + (ENTRY_MARK if is_entry else ""),
                           **{k: v for k, v in score_row(samples.images, references, {}).items() if k.endswith("/fd")}}
                    print(row, flush=True)
                    rows.append(row)
    payload = {"run": args.run, "n": args.n, "best_recipes": BEST_RECIPES, "fewer_calls": FEWER_CALLS, "rows": rows}
    write_results(RESULTS, args.stem, payload, rows, ["run", "seed", "nfe", "recipe", *(f"{s}/fd" for s in references)])


if __name__ == "__main__":
    main()
