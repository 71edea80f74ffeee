"""Draw samples with a sampler recipe and write the samples file plus PNG grids.

    python -m bdiff.sample --ckpt runs/bdiff/<id>/checkpoints/last.ckpt \\
        --config configs/sampler/dpmpp_blend.yaml --n 1000 --seed 0 --out samples.npz

Writes ``samples.npz`` (format: :mod:`bdiff.metrics.samples_file`) and
``samples.png`` (the first 64 samples beside their uncertainty maps). Sample i
depends only on (seed, i): chunk size and device count do not change it.
``--devices N`` spreads the samples over N processes/devices with Lightning
Fabric (DDP; gloo on CPU) and gathers them on rank 0.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bdiff.checkpoint import load_model
from bdiff.metrics.samples_file import SampleSet, save_samples
from bdiff.sampling.recipe import Recipe
from bdiff.viz import save_side_by_side, uncertainty_grids


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bdiff.sample", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    p.add_argument("--config", required=True, help="sampler recipe YAML (configs/sampler/*.yaml)")
    p.add_argument("--n", type=int, default=1000, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.npz")
    p.add_argument("--batch-size", type=int, default=500, help="samples per sampler call")
    p.add_argument("--devices", type=int, default=1, help="processes/devices to spread the work over")
    p.add_argument("--accelerator", default="cpu", help="cpu, cuda, auto")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.devices < 1:
        p.error(f"--devices must be >= 1, got {args.devices}")
    return args


def draw(recipe: Recipe, ckpt: str, indices: range, seed: int, batch_size: int, device: torch.device, progress: bool) -> tuple[dict, bool]:
    """Sample the given global indices in chunks.

    Returns images/variance in [-1,1] scale and NFE per sample, and whether the model is Bayesian.
    """
    denoiser = load_model(ckpt, map_location=device, num_samples=recipe.posterior_samples)
    sampler = recipe.build(denoiser)
    empty = torch.zeros((0, *denoiser.image_shape))
    images, variances, nfe = [empty], [empty], [torch.zeros(0)]
    chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    for chunk in tqdm(chunks, desc="sampling", unit="batch", disable=not progress):
        result = sampler.sample(len(chunk), seed=seed, first_index=chunk.start, device=device)
        images.append(result.images.cpu())
        variances.append(result.variance.cpu())
        nfe.append(result.nfe.cpu().float())
    parts = {"images": torch.cat(images), "variance": torch.cat(variances), "nfe": torch.cat(nfe)}
    return parts, denoiser.is_bayesian


def peak_memory_mb(device: torch.device | str = "cpu") -> float:
    """Peak memory of this process: CUDA max allocated on a GPU, else peak resident set size (Linux/macOS)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def write_outputs(out: Path, parts: dict, seconds: float, recipe: Recipe, args: argparse.Namespace, bayesian: bool) -> None:
    images01 = ((parts["images"] + 1) / 2).clamp(0, 1)
    variance01 = parts["variance"] / 4  # Var[(x+1)/2] = Var[x]/4
    config = {"recipe": recipe.as_dict(), "ckpt": str(args.ckpt), "seed": args.seed, "n": args.n, "devices": args.devices,
              "peak_memory_mb": parts.get("peak_memory_mb")}
    save_samples(out, SampleSet(images01, variance01 if bayesian else None, float(parts["nfe"].mean()), seconds, config))
    first = slice(0, min(64, len(images01)))
    grids = uncertainty_grids(parts["images"][first], parts["variance"][first], nrow=8)
    png = save_side_by_side(out.with_suffix(".png"), *grids)
    print(f"wrote {out} ({len(images01)} samples, mean NFE {float(parts['nfe'].mean()):.2f}, {seconds:.1f} s) and {png}")
    print(json.dumps({"nfe_mean": float(parts["nfe"].mean()), "seconds": seconds}))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    recipe = Recipe.from_yaml(args.config)  # validated before any work
    out = Path(args.out)
    if args.devices == 1:
        device = torch.device("cuda" if args.accelerator in ("cuda", "gpu") else "cpu")
        if args.accelerator == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        start = time.perf_counter()
        parts, bayesian = draw(recipe, args.ckpt, range(args.n), args.seed, args.batch_size, device, progress=True)
        parts["peak_memory_mb"] = peak_memory_mb(device)
        write_outputs(out, parts, time.perf_counter() - start, recipe, args, bayesian)
        return
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=args.accelerator, devices=args.devices, strategy="ddp")
    fabric.launch()
    per_rank = math.ceil(args.n / fabric.world_size)
    lo = min(args.n, fabric.global_rank * per_rank)
    mine = range(lo, min(args.n, lo + per_rank))
    start = time.perf_counter()
    parts, bayesian = draw(recipe, args.ckpt, mine, args.seed, args.batch_size, fabric.device, progress=fabric.is_global_zero)
    padded = {k: _pad(v, per_rank) for k, v in parts.items()}
    gathered = {k: fabric.all_gather(v.to(fabric.device)) for k, v in padded.items()}  # (world, per_rank, ...)
    seconds = time.perf_counter() - start
    if fabric.is_global_zero:
        merged = {k: v.reshape(-1, *v.shape[2:])[: args.n].cpu() for k, v in gathered.items()}
        merged["peak_memory_mb"] = peak_memory_mb(fabric.device)  # rank 0
        write_outputs(out, merged, seconds, recipe, args, bayesian)
    fabric.barrier()


def _pad(t: torch.Tensor, size: int) -> torch.Tensor:
    """Pad dim 0 to ``size`` (ranks with fewer samples) so all_gather sees equal shapes."""
    if t.shape[0] == size:
        return t
    pad = torch.zeros((size - t.shape[0], *t.shape[1:]), dtype=t.dtype)
    return torch.cat([t, pad])


if __name__ == "__main__":
    main()
