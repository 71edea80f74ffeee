"""Draw samples with a sampler recipe and write the samples file plus PNG grids.

    python -m bdiff.sample --ckpt runs/bdiff/<id>/checkpoints/last.ckpt \\
        --config configs/sampler/dpmpp_blend.yaml --n 1000 --seed 0 --out samples.npz

Writes ``samples.npz`` (format: :mod:`bdiff.metrics.samples_file`) and
``samples.png`` (the first 64 samples beside their uncertainty maps). Sample i
depends only on (seed, i): chunk size and device count do not change it.
``--devices N`` spreads the samples over N processes/devices with Lightning
Fabric (DDP; gloo on CPU) and gathers them on rank 0.

Memory does not grow with ``--n``: each finished chunk of ``--batch-size``
samples is written to a temporary file beside ``--out`` and the ``.npz`` is
assembled from those at the end (:class:`~bdiff.metrics.samples_file.SamplesWriter`),
so a run holds one chunk per device (model activations for K weight samples,
callback state such as a Recorder's records) whatever N is. A failed run leaves
no partial file and an earlier ``--out`` untouched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bdiff.checkpoint import load_model
from bdiff.metrics.samples_file import SamplesWriter
from bdiff.sampling.recipe import Recipe
from bdiff.viz import save_side_by_side, uncertainty_grids

PREVIEW = 64  # samples shown in the PNG grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bdiff.sample", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    p.add_argument("--config", required=True, help="sampler recipe YAML (configs/sampler/*.yaml)")
    p.add_argument("--n", type=int, default=1000, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.npz")
    p.add_argument("--batch-size", type=int, default=500, help="samples per sampler call (and in memory at once)")
    p.add_argument("--devices", type=int, default=1, help="processes/devices to spread the work over")
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda", "gpu", "auto"], help="cpu, cuda, auto")
    p.add_argument("--critic", default=None,
                   help="critic checkpoint for the recipe's critic callback (overrides the path in the YAML)")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.devices < 1:
        p.error(f"--devices must be >= 1, got {args.devices}")
    if Path(args.out).is_dir():
        p.error(f"--out {args.out!r} is a directory; give a file name such as samples.npz")
    if args.accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        p.error(f"--accelerator {args.accelerator} asked for, but torch sees no CUDA device; use --accelerator cpu")
    return args


def chunk_ranges(n: int, batch_size: int) -> list[range]:
    """Global sample indices 0..n-1 cut into consecutive chunks of at most ``batch_size``."""
    return [range(lo, min(n, lo + batch_size)) for lo in range(0, n, batch_size)]


class SampleOutput:
    """Streams finished chunks, in index order, into the samples file: memory holds one chunk.

    Keeps only what the end needs: the NFE sum and the first 64 samples for the PNG grid.
    """

    def __init__(self, out: Path, n: int, image_shape: tuple[int, ...], bayesian: bool) -> None:
        self.out, self.n, self.bayesian = out, n, bayesian
        self.writer = SamplesWriter(out, n, image_shape, with_variance=bayesian)
        self.nfe_sum = 0.0
        self.preview: list[tuple[torch.Tensor, torch.Tensor]] = []  # [-1, 1] scale
        self.kept = 0

    def add(self, images: torch.Tensor, variance: torch.Tensor, nfe: torch.Tensor) -> None:
        """One chunk, images/variance (B,C,H,W) in [-1, 1] scale on the CPU, nfe (B,)."""
        images01 = ((images + 1) / 2).clamp(0, 1)
        self.writer.write(images01, variance / 4 if self.bayesian else None)  # Var[(x+1)/2] = Var[x]/4
        self.nfe_sum += float(nfe.double().sum())
        if self.kept < PREVIEW:
            take = min(PREVIEW - self.kept, len(images))
            self.preview.append((images[:take].clone(), variance[:take].clone()))
            self.kept += take

    def finish(self, seconds: float, recipe: Recipe, args: argparse.Namespace, peak_mb: float) -> None:
        nfe = self.nfe_sum / self.n
        config = {"recipe": recipe.as_dict(), "ckpt": str(args.ckpt), "seed": args.seed, "n": args.n, "devices": args.devices,
                  "batch_size": args.batch_size, "peak_memory_mb": peak_mb}
        self.writer.finish(nfe, seconds, config)
        images, variance = (torch.cat(parts) for parts in zip(*self.preview))
        png = save_side_by_side(self.out.with_suffix(".png"), *uncertainty_grids(images, variance, nrow=8))
        print(f"wrote {self.out} ({self.n} samples, mean NFE {nfe:.2f}, {seconds:.1f} s) and {png}")
        print(json.dumps({"nfe_mean": nfe, "seconds": seconds}))


def draw(recipe: Recipe, args: argparse.Namespace, device: torch.device, fabric: Any = None) -> None:
    """Sample all chunks, round-robin over the ranks; rank 0 writes each to ``args.out`` as it arrives.

    Round j gives chunk j * world + rank to each rank and gathers the chunks on rank 0, so
    memory holds one round whatever ``--n`` is. Sample i depends only on (seed, i).
    """
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    start = time.perf_counter()
    denoiser = load_model(args.ckpt, map_location=device, num_samples=recipe.posterior_samples)
    sampler = recipe.build(denoiser)
    chunks = chunk_ranges(args.n, args.batch_size)
    output = SampleOutput(Path(args.out), args.n, tuple(denoiser.image_shape), denoiser.is_bayesian) if rank == 0 else None
    with output.writer if output is not None else contextlib.nullcontext():
        for j in tqdm(range(math.ceil(len(chunks) / world)), desc="sampling", unit="batch", disable=rank != 0):
            k = j * world + rank
            if k < len(chunks):
                r = sampler.sample(len(chunks[k]), seed=args.seed, first_index=chunks[k].start, device=device)
                parts = (r.images, r.variance, r.nfe.float())
                del r  # the callbacks' extras (a Recorder's records) go with it
            else:  # this rank has no chunk in the last round
                parts = (torch.zeros(0, *denoiser.image_shape, device=device),) * 2 + (torch.zeros(0, device=device),)
            if fabric is None:
                output.add(*(t.cpu() for t in parts))
                continue
            gathered = fabric.all_gather(tuple(_pad(t, args.batch_size) for t in parts))  # each (world, batch, ...)
            if output is not None:
                for other in range(world):
                    if j * world + other < len(chunks):
                        size = len(chunks[j * world + other])
                        output.add(*(g[other, :size].cpu() for g in gathered))
            del gathered
        if output is not None:
            output.finish(time.perf_counter() - start, recipe, args, peak_memory_mb(device))


def peak_memory_mb(device: torch.device | str = "cpu") -> float:
    """Peak memory of this process: CUDA max allocated on a GPU, else peak resident set size (Linux/macOS)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    recipe = Recipe.from_yaml(args.config)  # validated before any work
    if args.critic is not None:
        recipe = recipe.with_critic(args.critic)
    if args.devices == 1:
        device = torch.device("cuda" if args.accelerator in ("cuda", "gpu") else "cpu")
        if args.accelerator == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        draw(recipe, args, device)
        return
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=args.accelerator, devices=args.devices, strategy="ddp")
    fabric.launch()
    draw(recipe, args, fabric.device, fabric)
    fabric.barrier()


def _pad(t: torch.Tensor, size: int) -> torch.Tensor:
    """Pad dim 0 to ``size`` (a short or missing chunk) so all_gather sees equal shapes."""
    if t.shape[0] == size:
        return t
    pad = torch.zeros((size - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    return torch.cat([t, pad])


if __name__ == "__main__":
    main()
