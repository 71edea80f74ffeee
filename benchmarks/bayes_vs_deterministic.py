"""Does being Bayesian cost image quality? Posterior-mean samples of the default model vs the same U-Net trained deterministically.

    python train.py                                          # Bayesian head (default)
    python train.py fit --model.bayes.layers none            # same config, deterministic
    python benchmarks/bayes_vs_deterministic.py --bayes <ckpt> --deterministic <ckpt> [--n 2000]

Both checkpoints hold EMA weights. Each is sampled from the same per-sample noise
with DPM-Solver++(2M) at 10 steps and DDIM at 50 steps; metrics in the digits
feature space against the real training split.
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
RECIPES = {"dpm++2m-10": {"stepper": "dpmpp_2m", "steps": 10}, "ddim-50": {"stepper": "ddim", "steps": 50}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bayes", required=True)
    p.add_argument("--deterministic", required=True)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    torch.set_num_threads(2)
    extractor, f_real = reference_for("digits")
    rows = []
    for model, ckpt in (("bayesian head", args.bayes), ("deterministic", args.deterministic)):
        denoiser = load_model(ckpt)
        for name, spec in RECIPES.items():
            samples = run_ours(Recipe.from_dict(spec, name=name), denoiser, args.n, args.seed, 1000)
            row = {"model": model, "sampler": name, **evaluate_sample_set(samples, f_real, extractor)}
            rows.append(row)
            print(f"{model:14s} {name:12s} FD {row['fd']:.3f} KID {row['kid']:.3f} P {row['precision']:.3f} R {row['recall']:.3f}")
    write_results(args.out, "bayes_vs_deterministic", rows, rows, ["model", "sampler", "fd", "kid", "precision", "recall", "nfe"])


if __name__ == "__main__":
    main()
