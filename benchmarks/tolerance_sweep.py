"""Tuning the uncertainty-aware recipes at 5 and 10 NFE: adaptive-step tolerance and refinement settings.

    python benchmarks/tolerance_sweep.py --ckpt runs/bdiff/<id>/checkpoints/last.ckpt [--n 2000]

Same noise, network and metrics as benchmarks/peers.py (whose peer rows these are
read against). The tolerances are chosen on this very metric: no held-out split.
Writes benchmarks/results/tolerance_sweep.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bdiff.checkpoint import load_model
from bdiff.evaluate import reference_for
from bdiff.metrics.report import evaluate_sample_set
from bdiff.sampling.recipe import Recipe

from peers import run_ours, write_results  # noqa: E402  (benchmarks/ is the script's folder)

ROOT = Path(__file__).resolve().parents[1]


def adaptive(nfe: int, tol: float) -> dict:
    return {"stepper": "dpmpp_2m", "steps": nfe, "callbacks": [{"name": "adaptive", "tol": tol, "max_nfe": nfe}]}


def refine(steps: int, quantile: float, jump: int, t_range: list[int], passes: int) -> dict:
    cb = {"name": "refine", "quantile": quantile, "jump": jump, "t_range": t_range, "max_passes": passes}
    return {"stepper": "dpmpp_2m", "steps": steps, "callbacks": [cb]}


GRID = {
    **{f"dpm++2m+adaptive tol={tol} @5": adaptive(5, tol) for tol in (0.2, 0.3, 0.4, 1.0)},
    **{f"dpm++2m+adaptive tol={tol} @10": adaptive(10, tol) for tol in (0.1, 0.15, 0.2, 0.3)},
    "dpm++2m 4 steps + refine 1 pass @5": refine(4, 0.8, 50, [100, 500], 1),
    "dpm++2m 9 steps + refine 1 pass @10": refine(9, 0.8, 50, [50, 400], 1),
    "dpm++2m 9 steps + refine 1 pass (q=0.5) @10": refine(9, 0.5, 50, [50, 400], 1),
    "dpm++2m 8 steps + refine 2 passes, jump 100 @10": refine(8, 0.8, 100, [50, 600], 2),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    torch.set_num_threads(2)
    den = load_model(args.ckpt)
    extractor, f_real = reference_for("digits")
    rows = []
    for name, spec in GRID.items():
        samples = run_ours(Recipe.from_dict(spec, name=name), den, args.n, args.seed, 1000)
        rows.append({"recipe": name, **evaluate_sample_set(samples, f_real, extractor)})
        print(f"{name:48s} NFE {rows[-1]['nfe']:.2f} FD {rows[-1]['fd']:.3f}", flush=True)
    write_results(args.out, "tolerance_sweep", rows, rows, ["recipe", "nfe", "fd", "kid", "precision", "recall", "seconds"])


if __name__ == "__main__":
    main()
