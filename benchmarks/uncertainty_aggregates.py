"""Which per-sample aggregate of the uncertainty map finds bad samples? (issue 4 usefulness target)

    python benchmarks/uncertainty_aggregates.py --ckpt runs/bdiff/<id>/checkpoints/last.ckpt [--n 2000]

DPM-Solver++(2M) samples at 10 and 20 steps (seed 0 is the noise of benchmarks/peers.py;
seeds 1 and 2 show how much the ratio moves with the draw); for each aggregate u of the propagated per-pixel variance: FD after dropping the
20% with the largest u vs a random 20% (5 seeds), Spearman(u, distance to the
nearest real feature) and AUROC for the worst 20%.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from bdiff.checkpoint import load_model
from bdiff.evaluate import reference_for
from bdiff.metrics.frechet import extract_features
from bdiff.metrics.usefulness import auroc_worst, fd_after_filtering, nearest_real_distance, spearman
from bdiff.sampling.recipe import Recipe

from peers import run_ours, write_results  # noqa: E402  (benchmarks/ is the script's folder)

ROOT = Path(__file__).resolve().parents[1]


def aggregates(images: torch.Tensor, variance: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample scores (N,) from images and variance (N,C,H,W) in [0,1] scale."""
    std = variance.clamp(min=0).sqrt().flatten(1)
    ink = images.flatten(1).mean(1)
    mean_var = variance.flatten(1).mean(1)
    stroke = images.flatten(1) > 0.3
    # log mean variance minus its least-squares fit on log ink (fit on the batch itself)
    design = torch.stack([torch.ones_like(ink), ink.clamp(min=1e-3).log()], 1).double()
    target = mean_var.clamp(min=1e-30).log().double()[:, None]
    residual = (target - design @ torch.linalg.lstsq(design, target).solution)[:, 0].float()
    return {
        "mean variance": mean_var,
        "mean std": std.mean(1),
        "max std": std.amax(1),
        "mean std per ink (std / mean intensity)": std.mean(1) / ink.clamp(min=0.05),
        "mean std over stroke pixels (intensity > 0.3)": (std * stroke).sum(1) / stroke.sum(1).clamp(min=1),
        "log mean variance, residual of a fit on log ink": residual,
        "ink only (control, no uncertainty)": ink,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    torch.set_num_threads(2)
    den = load_model(args.ckpt)
    extractor, f_real = reference_for("digits")
    rows = []
    for seed, steps in itertools.product(args.seeds, (10, 20)):
        s = run_ours(Recipe.from_dict({"stepper": "dpmpp_2m", "steps": steps}), den, args.n, seed, 1000)
        f_fake = extract_features(s.images, extractor)
        q = nearest_real_distance(f_fake, f_real)
        for name, u in aggregates(s.images, s.variance).items():
            r = fd_after_filtering(f_real, f_fake, u, drop=0.2, seeds=range(5))
            rows.append({"seed": seed, "steps": steps, "aggregate": name, "fd_drop_uncertain": r["fd_drop_uncertain"],
                         "fd_drop_random_mean": r["fd_drop_random_mean"],
                         "ratio": r["fd_drop_uncertain"] / r["fd_drop_random_mean"],
                         "spearman": spearman(u, q), "auroc_worst_20": auroc_worst(u, q)})
    write_results(args.out, "uncertainty_aggregates", rows, rows,
                  ["seed", "steps", "aggregate", "fd_drop_uncertain", "fd_drop_random_mean", "ratio", "spearman", "auroc_worst_20"])


if __name__ == "__main__":
    main()
