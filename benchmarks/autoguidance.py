"""Autoguidance on the default model: does guiding with a weaker model beat the unguided sampler?

    python benchmarks/autoguidance.py --run A=runs/cos0/bdiff/<id>/checkpoints/last.ckpt:1 \\
        B=runs/cos1/bdiff/<id>/checkpoints/last.ckpt:0,2

Autoguidance (Karras et al., NeurIPS 2024; :mod:`bdiff.sampler_callbacks.autoguidance`) extrapolates from a
weaker model past the main one: eps' = eps + w (eps - eps_guide), at two denoiser calls per step.
For it to count at a budget of 2K calls it has to beat K unguided steps by enough to clear the
best peer at 2K calls (issue 14). This measures, at K grid steps (UniPC on the grid fitted from T-1,
the 10-NFE ``--nfe`` entry's grid), on each run and sampling seed, 2,000 samples each:

- the unguided sampler (the checkpoint's shipped EMA weights: the reference every ratio is to);
- the same with the optimizer's own weights at the end of training (``load_model(weights="current")``),
  unguided, on the same grid;
- autoguidance with each guide in :data:`GUIDES` (``configs/digits_guide.yaml`` trained with the run's
  own seed, cached under ``runs/guide/``; ~2-4 min each on 2 CPU cores) at each weight in :data:`WEIGHTS`.

FD, precision and recall in every feature space of the evaluator. Writes
``benchmarks/results/autoguidance.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from bdiff.checkpoint import load_model
from bdiff.metrics.frechet import extract_features
from bdiff.metrics.report import quality_from_features
from bdiff.sampling import Sampler, UniPC
from bdiff.sampler_callbacks.autoguidance import Autoguidance
from bdiff.sampling.grids import FittedGrid
from common import RESULTS, ROOT, references_for, write_results
from peers import parse_run

GUIDES = {"half width, quarter steps": (), "full width, quarter steps": ("--model.net.base_channels=32",)}
"""Guides: ``configs/digits_guide.yaml`` (16 channels, 1,200 steps) and the same at the default's 32 channels."""
WEIGHTS = (0.02, 0.05, 0.15)


def cached_guide(ckpt: Path, out_dir: Path, overrides: tuple[str, ...] = ()) -> Path:
    """``out_dir/last.ckpt``: ``configs/digits_guide.yaml`` (with the CLI ``overrides``) trained with the seed of the run
    that wrote ``ckpt``, unless one newer than ``ckpt`` is already there."""
    import shutil

    import yaml

    from bdiff.lit.cli import main as train

    path = out_dir / "last.ckpt"
    if path.is_file() and path.stat().st_mtime >= ckpt.stat().st_mtime:
        return path
    config = ckpt.resolve().parents[1] / "config.yaml"
    seed = yaml.safe_load(config.read_text()).get("seed_everything", 0) if config.is_file() else 0
    work = out_dir / "run"
    cli = train(ROOT / "configs" / "digits_guide.yaml", [
        "fit", "--config", str(ROOT / "configs" / "digits_guide.yaml"), f"--seed_everything={seed}",
        f"--trainer.default_root_dir={work}", f"--trainer.logger.init_args.save_dir={work}",
        "--trainer.enable_progress_bar=false", *overrides])
    shutil.copyfile(cli.trainer.checkpoint_callback.last_model_path, path)
    return path


def quality(images: torch.Tensor, references: dict) -> dict[str, float]:
    """FD, precision and recall per feature space of images (N,C,H,W) in [0, 1]."""
    out = {}
    for space, (extractor, f_real) in references.items():
        q = quality_from_features(f_real, extract_features(images, extractor))
        out.update({f"{space}/{k}": q[k] for k in ("fd", "precision", "recall")})
    return out


def sample(denoiser, grid: list[int], callbacks: list, n: int, seed: int, batch: int = 1000) -> tuple[torch.Tensor, float]:
    """n samples (N,C,H,W) in [0, 1] on ``grid`` with UniPC, and the mean denoiser calls per sample."""
    sampler = Sampler(denoiser, UniPC(), len(grid), callbacks, timesteps=grid)
    images, nfe = [], []
    for _, r in sampler.sample_chunks(n, batch, seed=seed):
        images.append((r.images + 1) / 2)
        nfe.append(r.nfe.float())
    return torch.cat(images), float(torch.cat(nfe).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", nargs="+", required=True, help="label=checkpoint:seed[,seed...], one per training run")
    p.add_argument("--steps", type=int, default=10, help="grid steps K (guided rows cost 2K calls)")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stem", default="autoguidance")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")
    references = references_for()
    rows = []
    for label, ckpt, seeds in map(parse_run, args.run):
        denoiser, current = load_model(ckpt), load_model(ckpt, weights="current")
        run_id = ckpt.resolve().parents[1].name
        guides = {name: load_model(cached_guide(ckpt, ROOT / "runs" / "guide" / f"{run_id}-{i}", overrides))
                  for i, (name, overrides) in enumerate(GUIDES.items())}
        grid = FittedGrid(late_start=False).timesteps(denoiser, args.steps)
        for seed in seeds:
            variants = [("unguided (EMA weights)", denoiser, []), ("unguided, optimizer's own weights", current, [])]
            variants += [(f"autoguidance w {w}, guide {name}", denoiser, [Autoguidance(guide, weight=w)])
                         for name, guide in guides.items() for w in WEIGHTS]
            base = None
            for name, model, callbacks in variants:
                images, nfe = sample(model, grid, callbacks, args.n, seed)
                row = {"run": label, "seed": seed, "sampler": name, "nfe": nfe, **quality(images, references)}
                base = base or row
                for space in references:
                    row[f"{space}/ratio"] = row[f"{space}/fd"] / base[f"{space}/fd"]
                rows.append(row)
                print(f"{label} seed {seed} {name:45s} NFE {nfe:4.1f} "
                      + "  ".join(f"{s} {row[f'{s}/fd']:.4f} ({row[f'{s}/ratio']:.2f})" for s in references), flush=True)
    columns = ["run", "seed", "sampler", "nfe",
               *[f"{s}/{k}" for s in references for k in ("fd", "ratio", "precision", "recall")]]
    write_results(RESULTS, args.stem, {"runs": args.run, "steps": args.steps, "n": args.n, "rows": rows}, rows, columns)


if __name__ == "__main__":
    main()
