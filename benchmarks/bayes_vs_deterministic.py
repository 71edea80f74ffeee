"""Does being Bayesian cost image quality? Posterior-mean samples of the default model vs the same U-Net trained deterministically.

    python train.py                                          # Bayesian head (default)
    python train.py fit --model.bayes.layers none            # same config, deterministic
    python benchmarks/bayes_vs_deterministic.py --bayes <ckpt> --deterministic <ckpt> [--n 2000] [--seeds 0 2]

Both checkpoints hold EMA weights. Each is sampled from the same per-sample noise
(every ``--seeds``) with DPM-Solver++(2M) at 10 steps and DDIM at 50 steps; FD, KID and
precision/recall against the real training split in every feature space of the evaluator
(digits CNN, digits_mlp classifier, raw pixels).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bdiff.checkpoint import load_model
from bdiff.evaluate import references_for
from bdiff.metrics.report import quality_in_spaces
from bdiff.sampling.recipe import Recipe

from peers import run_ours, write_results  # noqa: E402  (benchmarks/ is the script's folder)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"dpm++2m-10": {"stepper": "dpmpp_2m", "steps": 10}, "ddim-50": {"stepper": "ddim", "steps": 50}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bayes", required=True)
    p.add_argument("--deterministic", required=True)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    torch.set_num_threads(2)
    references = references_for()
    rows = []
    for model, ckpt in (("bayesian head", args.bayes), ("deterministic", args.deterministic)):
        denoiser = load_model(ckpt)
        for name, spec in RECIPES.items():
            for seed in args.seeds:
                samples = run_ours(Recipe.from_dict(spec, name=name), denoiser, args.n, seed, 1000)
                for space, quality in quality_in_spaces(samples.images, references).items():
                    rows.append({"model": model, "sampler": name, "seed": seed, "space": space, **quality})
                    r = rows[-1]
                    print(f"{model:14s} {name:11s} seed {seed} {space:10s} FD {r['fd']:.4f} KID {r['kid']:.3f} "
                          f"P {r['precision']:.3f} R {r['recall']:.3f}", flush=True)
    write_results(args.out, "bayes_vs_deterministic", rows, rows,
                  ["model", "sampler", "seed", "space", "fd", "kid", "precision", "recall"])


if __name__ == "__main__":
    main()
