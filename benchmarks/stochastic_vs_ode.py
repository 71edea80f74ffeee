"""Does stochastic sampling give a better distribution than the probability-flow ODE on this model?

    python benchmarks/stochastic_vs_ode.py --ckpt runs/cos0/bdiff/t5pxamkz/checkpoints/last.ckpt --seed 1

Issue 14's 20-NFE target asks for FD 0.8x the best ODE solver, whose 20-step answer is already the
ODE's own (BENCHMARKS.md, "Sampler quality at 5, 10 and 20 NFE"). Stochastic samplers draw from a different
distribution when the network is imperfect: the SDE's noise can contract errors that the ODE
carries (Karras et al. 2022, Sec. 4). This measures, on one run and sampling seed (the claims'
choose cell), FD, precision and recall in every feature space of the evaluator for the ODE
(UniPC, DPM-Solver++(2M) on the leading grid at 20 and 50 steps) and for DDIM with eta 0.5 and 1
at 20 steps and ancestral DDPM at 100 and 250 steps (our steppers, which match diffusers'
schedulers step for step). Writes ``benchmarks/results/stochastic_vs_ode.{json,md}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bdiff.checkpoint import load_model
from common import RESULTS, references_for, short_recipe, write_results
from peers import run_ours
from sampler_claims import score_row

SAMPLERS = {
    "ODE: unipc, 20 steps": {"stepper": "unipc", "steps": 20},
    "ODE: dpmpp_2m, 20 steps": {"stepper": "dpmpp_2m", "steps": 20},
    "ODE: dpmpp_2m, 50 steps": {"stepper": "dpmpp_2m", "steps": 50},
    "SDE: ddim eta 0.5, 20 steps": {"stepper": {"name": "ddim", "eta": 0.5}, "steps": 20},
    "SDE: ddim eta 1, 20 steps": {"stepper": {"name": "ddim", "eta": 1.0}, "steps": 20},
    "SDE: ddpm, 100 steps": {"stepper": "ddpm", "steps": 100},
    "SDE: ddpm, 250 steps": {"stepper": "ddpm", "steps": 250},
}
"""Every sampler on diffusers' leading grid (the best peers' grid at 20 NFE on most cells)."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    references, denoiser = references_for(), load_model(args.ckpt)
    rows = []
    for name, spec in SAMPLERS.items():
        recipe = short_recipe({**spec, "spacing": "leading"}, name=name)
        samples = run_ours(recipe, denoiser, args.n, args.seed, 1000)
        rows.append({"sampler": name, "nfe": samples.nfe, "seconds": round(samples.seconds, 1),
                     **score_row(samples.images, references, {})})
        print(name, "  ".join(f"{s} {rows[-1][f'{s}/fd']:.4f}" for s in references), flush=True)
    columns = ["sampler", "nfe", *[f"{s}/{k}" for s in references for k in ("fd", "precision", "recall")]]
    payload = {"ckpt": str(args.ckpt), "seed": args.seed, "n": args.n, "rows": rows}
    write_results(RESULTS, "stochastic_vs_ode", payload, rows, columns)


if __name__ == "__main__":
    main()
