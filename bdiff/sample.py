"""Draw samples with a sampler recipe and write the samples file plus PNG grids.

    bdiff-sample --ckpt runs/bdiff/<id>/checkpoints/last.ckpt --nfe 10 --n 1000 --out samples.npz
    bdiff-sample --ckpt runs/bdiff/<id>/checkpoints/last.ckpt --sampler configs/sampler/unipc.yaml --n 1000

``--nfe N`` picks the measured-best recipe for at most N denoiser calls per sample
(:mod:`bdiff.sampling.budget`; at some budgets it takes fewer). ``--sampler FILE`` names a recipe
(:mod:`bdiff.sampling.recipe`) and ``--sampler.<key>`` overrides one of its keys (``--sampler.steps 20``,
``--sampler.stepper.variant bh1``). The command line is a jsonargparse parser, like train.py's:
``--print_config`` prints the whole job as YAML, which ``--config job.yaml`` runs again.
``python -m bdiff.sample`` is the same command.

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

Every sample of a Bayesian model gets a per-sample uncertainty ``score`` in the samples file
(:func:`bdiff.metrics.usefulness.sample_score`: its rank among its look-alikes, 1 = least certain).
``--keep F`` draws ``ceil(n / F)`` samples and keeps the ``n`` most certain by that score; the
file's ``nfe`` is then the denoiser calls per *kept* sample. The score needs the whole batch (it
clusters the samples), so the end of a run loads the file once (N images and variance maps).

``--wandb-project P`` also logs the run to Weights & Biases (offline without
credentials, like training): a ``wandb.Table`` ``samples`` with one row per sample
(image, uncertainty map, mean per-pixel variance, NFE, and the critic's logit when
the recipe has a critic; the first ``--wandb-rows``), the PNG grid and the mean NFE.
The run id goes into the samples file's config (``config["wandb"]``) and the last
line prints how to log ``bdiff-evaluate``'s metrics to the same run. A failing W&B
call never fails sampling: it continues offline, then switches W&B off.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from jsonargparse import ActionConfigFile, Namespace
from tqdm import tqdm

from bdiff.checkpoint import load_model
from bdiff.console import ArgumentParser, exit_on_user_error, program_name
from bdiff.metrics.samples_file import SampleSet, SamplesWriter, load_samples, save_samples
from bdiff.metrics.usefulness import keep_most_certain
from bdiff.sampling.budget import recipe_for_budget
from bdiff.sampler_callbacks.critic import CriticCorrection, CriticOutput
from bdiff.sampling.recipe import Recipe, add_recipe_arguments, load_recipe, recipe_given
from bdiff.sampling.sampler import chunk_ranges
from bdiff.viz import save_side_by_side, uncertainty_grids

PREVIEW = 64  # samples shown in the PNG grid


def parse_args(argv: list[str] | None = None) -> Namespace:
    """The command line (jsonargparse, like train.py's LightningCLI): the job's options and the recipe group.

    ``--sampler FILE`` reads a recipe (:func:`~bdiff.sampling.recipe.add_recipe_arguments`), later
    ``--sampler.<key>`` options override its keys (``--sampler.steps 20``), and ``--print_config`` prints the
    whole job as YAML to rerun with ``--config``.
    """
    p = ArgumentParser(prog=program_name("bdiff-sample", "bdiff.sample"), description=__doc__.splitlines()[0])
    p.add_argument("--config", action=ActionConfigFile, help="a whole job saved with --print_config")
    p.add_argument("--ckpt", type=str, required=True, help="checkpoint written by train.py")
    p.add_argument("--nfe", type=Optional[int], default=None,
                   help="a budget of denoiser calls per sample: use the measured-best recipe for it "
                        "(bdiff.sampling.budget; it may take fewer calls) instead of a recipe; with --keep F, "
                        "per kept sample (the recipe for floor(F N) calls per drawn sample)")
    add_recipe_arguments(p)  # --sampler configs/sampler/<name>.yaml, --sampler.steps ...
    p.add_argument("--n", type=int, default=1000, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=float, default=1.0,
                   help="draw ceil(n / keep) samples and keep the n most certain by the per-sample score (0 < keep <= 1)")
    p.add_argument("--out", type=str, default="samples.npz")
    p.add_argument("--batch-size", type=int, default=500, help="samples per sampler call (and in memory at once)")
    p.add_argument("--devices", type=int, default=1, help="processes/devices to spread the work over")
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda", "gpu", "auto"], help="cpu, cuda, auto")
    p.add_argument("--critic", type=Optional[str], default=None,
                   help="critic checkpoint for the recipe's critic callback (overrides the path in the YAML)")
    p.add_argument("--wandb-project", type=Optional[str], default=None,
                   help="also log to this W&B project: a table with one row per sample, sortable by uncertainty")
    p.add_argument("--wandb-rows", type=int, default=1000,
                   help="rows of the W&B samples table (the first samples; memory: rows x image size x 6 bytes)")
    p.add_argument("--debug", action="store_true", help="on an error, show the full traceback (also BDIFF_DEBUG=1)")
    args = p.parse_args(argv)
    if args.nfe is None and not recipe_given(args):
        p.error("no sampler recipe: give --nfe N (the measured-best recipe for N denoiser calls) or --sampler "
                "configs/sampler/<name>.yaml (or --sampler.stepper and --sampler.steps)")
    if args.nfe is not None and (recipe_given(args) or args.sampler.grid is not None or args.sampler.callbacks):
        p.error("--nfe picks the recipe itself; it is not allowed with a --sampler recipe; drop one or the other "
                "(--sampler.posterior_samples still sets K)")
    if args.nfe is not None and args.nfe < 1:
        p.error(f"--nfe must be >= 1 denoiser calls per sample, got {args.nfe}")
    if args.nfe is not None and args.critic is not None:
        p.error("--nfe picks a recipe without a critic (no critic recipe measured better than the same budget "
                "without one); to sample with a critic, name a recipe with a critic callback: --sampler <recipe.yaml>")
    for flag, value, low in (("--n", args.n, 1), ("--batch-size", args.batch_size, 1), ("--devices", args.devices, 1),
                             ("--wandb-rows", args.wandb_rows, 0)):
        if value < low:
            p.error(f"{flag} must be >= {low}, got {value}")
    if not 0 < args.keep <= 1:
        p.error(f"--keep must be a fraction in (0, 1] (0.8: draw n / 0.8 samples, keep the n most certain), got {args.keep}")
    if Path(args.out).is_dir():
        p.error(f"--out {args.out!r} is a directory; give a file name such as samples.npz")
    if args.accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        p.error(f"--accelerator {args.accelerator} asked for, but torch sees no CUDA device; use --accelerator cpu")
    return args


def recipe_of(args: Namespace) -> Recipe:
    """The recipe the command line asks for: ``--nfe``'s or ``--sampler``'s; ValueError naming a bad key."""
    if args.nfe is not None:  # with --keep F, N calls per *kept* sample: the recipe for floor(F N) per drawn one
        calls = max(1, math.floor(args.nfe * args.keep + 1e-9))
        return recipe_for_budget(calls, posterior_samples=args.sampler.posterior_samples)
    path = args.sampler.get("__path__")
    recipe = load_recipe(args.sampler, name=Path(str(path)).stem if path else "command-line")
    if args.critic is not None:
        critics = [cb for cb in recipe.callbacks if isinstance(cb, CriticCorrection)]
        if not critics:
            raise ValueError("--critic given, but the sampler recipe has no CriticCorrection callback for it to set")
        for cb in critics:
            cb.use_critic(args.critic)
    return recipe


def run_config(recipe: Recipe, args: Namespace) -> dict[str, Any]:
    """The settings stored in the samples file's config (and the W&B run's config)."""
    return {"recipe": recipe.config, "recipe_name": recipe.name, "ckpt": str(args.ckpt), "seed": args.seed, "n": args.n, "devices": args.devices,
            "batch_size": args.batch_size}


class SampleOutput:
    """Streams finished chunks, in index order, into the samples file: memory holds one chunk.

    Keeps only what the end needs: the NFE sum, the first 64 samples for the PNG grid and,
    for the W&B table, the first ``table_rows`` samples with their NFE and critic logit.
    """

    def __init__(self, out: Path, n: int, image_shape: tuple[int, ...], bayesian: bool, table_rows: int = 0,
                 draft: Path | None = None) -> None:
        self.out, self.n, self.bayesian, self.scored_later = out, n, bayesian, draft is not None
        self.writer = SamplesWriter(draft or out, n, image_shape, with_variance=bayesian)  # draft: scored into out later
        self.nfe_sum = 0.0
        self.preview: list[tuple[torch.Tensor, torch.Tensor]] = []  # [-1, 1] scale
        self.kept = 0
        self.table_rows = min(table_rows, n)
        self.rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # [0, 1] scale
        self.rows_kept = 0
        self.png: Path | None = None
        self.nfe_mean = math.nan

    def add(self, images: torch.Tensor, variance: torch.Tensor, nfe: torch.Tensor,
            critic_logit: torch.Tensor | None = None) -> None:
        """One chunk, images/variance (B,C,H,W) in [-1, 1] scale on the CPU, nfe (B,), critic_logit (B,) or None."""
        images01 = ((images + 1) / 2).clamp(0, 1)
        self.writer.write(images01, variance / 4 if self.bayesian else None)  # Var[(x+1)/2] = Var[x]/4
        self.nfe_sum += float(nfe.double().sum())
        if self.kept < PREVIEW:
            take = min(PREVIEW - self.kept, len(images))
            self.preview.append((images[:take].clone(), variance[:take].clone()))
            self.kept += take
        if self.rows_kept < self.table_rows:
            take = min(self.table_rows - self.rows_kept, len(images))
            logit = critic_logit[:take] if critic_logit is not None else torch.full((take,), math.nan)
            self.rows.append((images01[:take].half(), variance[:take] / 4, nfe[:take].float(), logit.float()))
            self.rows_kept += take

    def finish(self, seconds: float, config: dict[str, Any], peak_mb: float) -> None:
        nfe = self.nfe_mean = self.nfe_sum / self.n
        self.writer.finish(nfe, seconds, {**config, "peak_memory_mb": peak_mb})
        images, variance = (torch.cat(parts) for parts in zip(*self.preview))
        self.png = save_side_by_side(self.out.with_suffix(".png"), *uncertainty_grids(images, variance, nrow=8))
        done = f"drew {self.n} samples" if self.scored_later else f"wrote {self.out} ({self.n} samples"
        print(f"{done}, mean NFE {nfe:.2f}, {seconds:.1f} s{'' if self.scored_later else ')'} and wrote {self.png}")
        print(json.dumps({"nfe_mean": nfe, "seconds": seconds}))

    def wandb_data(self, with_critic: bool) -> dict[str, Any]:
        """What goes to the W&B run: the per-sample table, the PNG grid and the mean NFE (builds wandb objects)."""
        import wandb

        from bdiff.wandb_log import sample_table

        data: dict[str, Any] = {"nfe_mean": self.nfe_mean}
        if self.rows:
            images, variance, nfe, logit = (torch.cat(parts).float() for parts in zip(*self.rows))
            data["samples"] = sample_table(images, variance if self.bayesian else None, nfe,
                                           logit if with_critic else None)
        if self.png is not None:
            data["samples_grid"] = wandb.Image(str(self.png), caption="samples | per-pixel std")
        return data


def start_wandb(args: Namespace, config: dict[str, Any]) -> Any:
    """The W&B run of this sampling job (:class:`bdiff.wandb_log.SafeRun`), its folder beside ``--out``."""
    from bdiff.wandb_log import SafeRun

    return SafeRun(args.wandb_project, dir=Path(args.out).resolve().parent, job_type="sample",
                   config=json.loads(json.dumps(config)))


def finish_wandb(wb: Any, output: SampleOutput, args: Namespace, with_critic: bool) -> None:
    """Log the table, grid and NFE, finish the run and print where it went and how to add the evaluation."""
    logged = wb.log(lambda: output.wandb_data(with_critic), "logging the samples table")
    run_id, run_dir, offline, url = wb.id, wb.run_dir, wb.offline, getattr(wb.run, "url", None)
    wb.finish()
    if run_id is None or not logged or wb.mode == "disabled":
        return
    where = f"offline run {run_dir} (upload with `wandb sync {run_dir}`)" if offline else f"run {url or run_id}"
    print(f"W&B: samples table ({output.rows_kept} of {output.n} samples) logged to {where}. Evaluation metrics go "
          f"to the same run with: WANDB_RUN_ID={run_id} WANDB_RESUME=allow bdiff-evaluate --samples {args.out} "
          f"--wandb-project {args.wandb_project}")


def draw(recipe: Recipe, args: Namespace, device: torch.device, fabric: Any = None) -> None:
    """Sample all chunks, round-robin over the ranks; rank 0 writes each to ``args.out`` as it arrives.

    Round j gives chunk j * world + rank to each rank and gathers the chunks on rank 0, so
    memory holds one round whatever ``--n`` is. Sample i depends only on (seed, i).
    """
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    config = run_config(recipe, args)
    with_critic = any(isinstance(cb, CriticCorrection) for cb in recipe.callbacks)
    wb = start_wandb(args, config) if rank == 0 and args.wandb_project else None
    if wb is not None and wb.id is not None and wb.mode != "disabled":
        config["wandb"] = {"project": args.wandb_project, "run_id": wb.id}
    start = time.perf_counter()  # the samples file's seconds: sampling only, not W&B's start-up
    try:
        denoiser = load_model(args.ckpt, map_location=device, num_samples=recipe.posterior_samples)
        if args.nfe is not None and recipe.steps < args.nfe and rank == 0:
            print(f"--nfe {args.nfe}: the {recipe.steps}-call recipe as it is (it measured better than itself stretched "
                  f"to {args.nfe} steps; bdiff.sampling.budget.FEWER_CALLS)", file=sys.stderr, flush=True)
        if recipe.fitted:
            if rank == 0:
                print("timestep grid: fitted to this checkpoint (its first use solves teacher ODE trajectories, "
                      "later ones read the cache; bdiff.sampling.fitted_grid) ...", file=sys.stderr, flush=True)
            recipe.grid.fit(denoiser)
        sampler = recipe.build(denoiser)
        config["timesteps"] = sampler.grid[:-1].tolist()  # the grid sampled on (a fitted grid depends on the checkpoint)
        if args.keep < 1 and not denoiser.is_bayesian:
            raise ValueError(f"--keep {args.keep} ranks samples by their uncertainty, but {args.ckpt!r} holds a model "
                             "with no epistemic variance; drop --keep")
        n_drawn = math.ceil(args.n / args.keep - 1e-9)
        chunks = chunk_ranges(n_drawn, args.batch_size)
        rows = args.wandb_rows if wb is not None else 0
        out = Path(args.out)
        draft = out.with_name(f".{out.name}.drawn.npz")  # a Bayesian run's samples before scoring (and --keep)
        output = (SampleOutput(out, n_drawn, tuple(denoiser.image_shape), denoiser.is_bayesian, rows,
                               draft if denoiser.is_bayesian else None) if rank == 0 else None)
        with output.writer if output is not None else contextlib.nullcontext():
            for j in tqdm(range(math.ceil(len(chunks) / world)), desc="sampling", unit="batch", disable=rank != 0):
                k = j * world + rank
                if k < len(chunks):
                    r = sampler.sample(len(chunks[k]), seed=args.seed, first_index=chunks[k].start, device=device)
                    critic = r.output(CriticOutput)
                    logit = torch.full_like(r.nfe, math.nan, dtype=torch.float) if critic is None else critic.final_logit
                    parts = (r.images, r.variance, r.nfe.float(), logit.float())
                    del r  # the callbacks' outputs (a Recorder's records) go with it
                else:  # this rank has no chunk in the last round
                    parts = ((torch.zeros(0, *denoiser.image_shape, device=device),) * 2
                             + (torch.zeros(0, device=device),) * 2)
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
                output.finish(time.perf_counter() - start, config, peak_memory_mb(device))
        if output is not None and denoiser.is_bayesian:
            try:
                kept = score_and_keep(draft, Path(args.out), args.n)
            except BaseException:
                print(f"scoring the drawn samples failed; they are kept in {draft} (a samples file)", file=sys.stderr)
                raise
            draft.unlink()
            output.nfe_mean, output.n = kept.nfe, args.n
    except BaseException:
        if wb is not None:
            wb.finish(exit_code=1)
        raise
    if wb is not None and output is not None:
        finish_wandb(wb, output, args, with_critic)


def score_and_keep(drawn_file: Path, out: Path, n: int) -> SampleSet:
    """The samples file ``drawn_file`` with the per-sample score, written to ``out`` (atomically); where it holds more
    than ``n`` samples, only the ``n`` most certain (in their drawing order), ``nfe`` counted per kept sample and the
    PNG grid redrawn."""
    samples = load_samples(drawn_file)
    kept, score = keep_most_certain(samples.images, samples.variance, n)
    drawn = len(samples.images)
    config = samples.config if drawn == n else {**samples.config, "keep": {"kept": n, "drawn": drawn}}
    result = SampleSet(samples.images[kept], samples.variance[kept], samples.nfe * drawn / n, samples.seconds, config,
                       score[kept])
    save_samples(out, result)
    print(f"wrote {out} ({n} samples with their uncertainty score)")
    if drawn > n:
        images, variance = result.images[:PREVIEW] * 2 - 1, result.variance[:PREVIEW] * 4  # back to the [-1, 1] scale
        save_side_by_side(out.with_suffix(".png"), *uncertainty_grids(images, variance, nrow=8))
        print(f"kept the {n} most certain of {drawn} samples (--keep): {result.nfe:.2f} denoiser calls per kept sample")
    return result


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
    recipe = recipe_of(args)  # validated before any work
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
    exit_on_user_error(main)
