"""Peer table: our sampler recipes vs diffusers' DDIM, DPM-Solver++ and UniPC on the same trained network.

    python benchmarks/peers.py --ckpt runs/bdiff/<id>/checkpoints/last.ckpt [--n 2000]

Every sampler starts from the same per-sample noise (sample i depends only on
(seed, i)) and uses the same posterior-mean network. Metrics in the digits
feature space against the real training split (``bdiff.metrics``); the
1000-step ancestral DDPM run is the quality reference. Writes
``benchmarks/results/peers.json``, ``peers.md`` and plots of FD vs NFE and FD
vs wall time.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from bdiff.checkpoint import load_model  # noqa: E402
from bdiff.evaluate import reference_for  # noqa: E402
from bdiff.metrics.report import evaluate_sample_set, markdown_table  # noqa: E402
from bdiff.metrics.samples_file import SampleSet  # noqa: E402
from bdiff.sampling.noise import NoiseSource  # noqa: E402
from bdiff.sampling.recipe import Recipe  # noqa: E402
from bdiff.sampling.sampler import SampleResult  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCHED = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


GRIDS = ("leading", "linspace", "trailing", "karras")
"""Every timestep grid diffusers offers: its three ``timestep_spacing`` values and ``use_karras_sigmas``."""


def diffusers_scheduler(name: str, grid: str = "trailing"):
    """A fresh diffusers scheduler on one of :data:`GRIDS`; a ``-karras`` suffix on ``name`` means ``grid="karras"``."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    base, karras = name.removesuffix("-karras"), name.endswith("-karras") or grid == "karras"
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; known: {', '.join(GRIDS)}")
    spacing = {"use_karras_sigmas": True} if karras else {"timestep_spacing": grid}
    if base == "diffusers-ddim" and not karras:
        return DDIMScheduler(**SCHED, clip_sample=False, set_alpha_to_one=True, **spacing)
    if base == "diffusers-dpm++2m":
        return DPMSolverMultistepScheduler(**SCHED, algorithm_type="dpmsolver++", solver_order=2, **spacing)
    if base == "diffusers-unipc":
        return UniPCMultistepScheduler(**SCHED, **spacing)
    if base == "diffusers-ddpm" and not karras:
        return DDPMScheduler(**SCHED, clip_sample=False, **spacing)
    raise ValueError(name)


def set_diffusers_timesteps(sched, steps: int, grid: list[int] | None) -> None:
    """``steps`` timesteps as the scheduler spaces them, or exactly ``grid`` (descending train timesteps).

    DPMSolverMultistepScheduler takes custom timesteps itself. UniPC's set_timesteps does not,
    so we set its ``timesteps`` and ``sigmas`` (sqrt((1-a)/a) at each, then 0) as its own
    set_timesteps does for a grid it chose; on the trailing grid this reproduces its FD exactly.
    """
    if grid is None:
        sched.set_timesteps(steps)
    elif "timesteps" in inspect.signature(sched.set_timesteps).parameters:
        sched.set_timesteps(timesteps=list(grid))
    else:
        sched.set_timesteps(len(grid))
        ac = sched.alphas_cumprod.double()
        sigmas = ((1 - ac) / ac).sqrt()[torch.tensor(grid)].float()
        sched.timesteps = torch.tensor(grid, dtype=torch.long)
        sched.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])


@torch.no_grad()
def run_diffusers(name: str, steps: int, denoiser, x_T: torch.Tensor, seed: int, batch: int,
                  grid: list[int] | None = None, spacing: str = "trailing") -> SampleSet:
    """Sample with a diffusers scheduler (on its ``spacing`` grid, or on explicit timesteps ``grid``);
    model output = our posterior-mean eps."""
    out = []
    start = time.perf_counter()
    for lo in range(0, len(x_T), batch):
        sched = diffusers_scheduler(name, spacing)  # stateful: a fresh one per run
        set_diffusers_timesteps(sched, steps, grid)
        x = x_T[lo : lo + batch].clone()
        gen = torch.Generator().manual_seed(seed + lo)
        for t in sched.timesteps:
            eps = denoiser.predict(x, torch.full((len(x),), int(t), dtype=torch.long)).eps
            kwargs = {"generator": gen} if name == "diffusers-ddpm" else {}
            x = sched.step(eps, t, x, **kwargs).prev_sample
        out.append(x.clamp(-1, 1))
    seconds = time.perf_counter() - start
    images = (torch.cat(out) + 1) / 2
    config = {"sampler": name, "steps": steps, "grid": grid, "spacing": spacing}
    return SampleSet(images, None, float(len(sched.timesteps)), seconds, config)


def run_ours(recipe: Recipe, denoiser, n: int, seed: int, batch: int,
             on_chunk: Callable[[SampleResult], None] | None = None) -> SampleSet:
    """``n`` samples with ``recipe`` in chunks of ``batch``; ``on_chunk`` sees each chunk's full result (extras)."""
    sampler = recipe.build(denoiser)
    images, variances, nfe = [], [], []
    start = time.perf_counter()
    for lo in range(0, n, batch):
        r = sampler.sample(min(batch, n - lo), seed=seed, first_index=lo)
        if on_chunk is not None:
            on_chunk(r)
        images.append(r.images)
        variances.append(r.variance)
        nfe.append(r.nfe.float())
    seconds = time.perf_counter() - start
    images01 = (torch.cat(images) + 1) / 2
    return SampleSet(images01, torch.cat(variances) / 4, float(torch.cat(nfe).mean()), seconds, recipe.as_dict())


def recipes_at(nfe: int) -> list[Recipe]:
    """Our recipes at a budget of ``nfe`` sequential denoiser calls per sample."""
    specs = {
        "ours-ddim": {"stepper": "ddim", "steps": nfe},
        "ours-dpm++2m": {"stepper": "dpmpp_2m", "steps": nfe},
        "ours-dpm++2m+blend": {"stepper": "dpmpp_2m", "steps": nfe, "callbacks": [{"name": "blend"}]},
        "ours-ddim+adaptive": {"stepper": "ddim", "steps": nfe, "callbacks": [{"name": "adaptive", "tol": 0.5, "max_nfe": nfe}]},
        "ours-dpm++2m+refine": {
            "stepper": "dpmpp_2m", "steps": max(2, nfe - 2),
            "callbacks": [{"name": "refine", "quantile": 0.8, "jump": 50, "t_range": [50, 600], "max_passes": 2}],
        },
    }
    return [Recipe.from_dict(spec, name=name) for name, spec in specs.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50])
    p.add_argument("--reference-steps", type=int, default=1000, help="ancestral DDPM steps of the quality reference (0: skip)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    torch.set_num_threads(2)

    denoiser = load_model(args.ckpt)
    extractor, f_real = reference_for("digits")
    noise = NoiseSource(args.seed, range(args.n))
    x_T = noise.draw(tuple(denoiser.image_shape))
    rows = []

    def record(name: str, budget: int, samples: SampleSet) -> None:
        row = {"sampler": name, "budget": budget, **evaluate_sample_set(samples, f_real, extractor)}
        rows.append(row)
        print(f"{name:24s} budget {budget:4d}  NFE {row['nfe']:6.2f}  FD {row['fd']:.3f}  KID {row['kid']:.3f}  "
              f"P {row['precision']:.3f} R {row['recall']:.3f}  {row['seconds']:.1f}s", flush=True)

    for nfe in args.nfe:
        for name in ("diffusers-ddim", "diffusers-dpm++2m", "diffusers-unipc"):
            record(name, nfe, run_diffusers(name, nfe, denoiser, x_T, args.seed, args.batch))
        for recipe in recipes_at(nfe):
            record(recipe.name, nfe, run_ours(recipe, denoiser, args.n, args.seed, args.batch))
    if args.reference_steps:
        record("diffusers-ddpm", args.reference_steps,
               run_diffusers("diffusers-ddpm", args.reference_steps, denoiser, x_T, args.seed, args.batch))

    columns = ["sampler", "budget", "nfe", "fd", "kid", "precision", "recall", "seconds",
               "fd_drop_uncertain", "fd_drop_random_mean", "spearman_uncertainty_vs_nn_distance", "auroc_worst_20"]
    write_results(args.out, "peers", {"ckpt": args.ckpt, "n": args.n, "rows": rows}, rows, columns)
    plot(rows, args.out)


def write_results(out: Path, stem: str, payload: object, rows: list[dict], columns: list[str]) -> None:
    """Write ``<stem>.json`` (payload) and ``<stem>.md`` (a table of rows) into ``out``; print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str))
    table = markdown_table(rows, columns)
    (out / f"{stem}.md").write_text(table + "\n")
    print(table)


def plot(rows: list[dict], out: Path) -> None:
    """FD vs NFE and FD vs wall time, one line per sampler."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["sampler"] for r in rows):
        mine = [r for r in rows if r["sampler"] == name]
        style = "-o" if name.startswith("ours") else "--s"
        axes[0].plot([r["nfe"] for r in mine], [r["fd"] for r in mine], style, label=name, ms=4)
        axes[1].plot([r["seconds"] for r in mine], [r["fd"] for r in mine], style, label=name, ms=4)
    for ax, xlabel in zip(axes, ("NFE (sequential denoiser calls)", "wall time (s)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("FD (digits features)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "peers_fd.png", dpi=120)


if __name__ == "__main__":
    main()
