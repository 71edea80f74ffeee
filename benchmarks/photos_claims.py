"""The headline claims on the photos (32x32 RGB crops of scikit-image's photos, ``configs/photos32.yaml``).

    python -m bdiff.datasets.photos data/photos
    python train.py fit --config configs/photos32.yaml            # the default (and --seed_everything 1)
    python train.py fit --config configs/photos32_ddpm.yaml       # the plain DDPM at equal wall time
    python benchmarks/photos_claims.py --run A=runs/bdiff/<id>/checkpoints/last.ckpt:0 \
        --ddpm A=runs/bdiff/<ddpm id>/checkpoints/last.ckpt [--n 2000] [--stem photos_claims]

For each training run (``label=checkpoint:sampling seed[,seed]``) it measures, on the run's own data
(rebuilt from the checkpoint, :class:`bdiff.metrics.references.RealData`) and in its three feature
spaces (``classifier``: a CNN telling the 13 training photos apart; ``classifier_mlp``: an MLP of
another seed; ``pixels``, block-averaged to 16x16):

* **held-out photos**: mean per-image epistemic variance on every crop of the three photos never
  trained on over that on the validation crops of the training photos, and the AUROC of telling
  them apart by it, at t in {10, 50, 100, 250, 500, 750} (fixed noise, ``heldout_class.score``);
  and the cost of one ``predict`` with the GP over one deterministic forward of the network;
* **calibration**: z^2 of the total variance on the validation crops at t <= 750 (ideal 1), and the noise
  prediction's MSE there, for ``--ddpm`` networks too;
* **samplers**: FD, precision and recall of ``--nfe 5/10/20`` (:func:`bdiff.sampling.budget.recipe_for_budget`)
  and of each of diffusers' 11 configurations of the sampler claims (DDIM, DPM-Solver++(2M), UniPC
  on four grids, :func:`peers.first_11`) on the same network and per-sample noise; the bar is the
  best of them per budget and space. ``--ddpm`` networks run the diffusers configurations only:
  the default-vs-DDPM ratio (``best_vs_ddpm``) is best over best of the same diffusers configurations at each
  budget;
* with ``--clipped``, every configuration also with its x0 estimate clipped to the data range
  (diffusers' ``clip_sample`` / ``thresholding``; ours: :class:`~bdiff.sampler_callbacks.clip_x0.ClipX0`);
* ``--recipes``: sampler recipe files (e.g. ``configs/sampler/unipc_prior_fusion.yaml``), each at the budget of its
  own steps, scored and filtered like ``--nfe``;
* **filtering**: FD after dropping the 20% of ``--nfe 10`` samples with the highest per-sample
  uncertainty score (:func:`bdiff.metrics.usefulness.sample_score`, what ``bdiff.sample`` stores)
  over FD after dropping a random 20% (mean of 5), for ``--nfe`` and the recipes.

Writes ``benchmarks/results/<stem>.json`` and ``<stem>.md``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, write_results
from heldout_class import cost_ratios, score
from peers import Peer, first_11, parse_run, run_ours, run_peer
from sampler_claims import score_row

from bdiff.checkpoint import datamodule_of, load_model, read_checkpoint
from bdiff.lit.feature_module import ensure_feature_nets
from bdiff.metrics.calibration import calibration_at_t
from bdiff.metrics.references import RealData, references_for
from bdiff.metrics.usefulness import sample_score
from bdiff.sampler_callbacks.clip_x0 import ClipX0
from bdiff.sampling.budget import recipe_for_budget
from bdiff.sampling.noise import NoiseSource
from bdiff.sampling.recipe import load_recipe

NFES = (5, 10, 20)
CALIBRATION_T = (10, 50, 100, 250, 500, 750)
MAX_IMAGES = 600  # seen / held-out crops scored per run (fixed subsets)


def stacked(dataset: Any, limit: int, seed: int = 0) -> torch.Tensor:
    """Up to ``limit`` items of ``dataset`` (a seeded subset when it holds more), (N,C,H,W) in [-1, 1]."""
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return torch.stack([dataset[int(i)] for i in idx])


def heldout_rows(label: str, denoiser, ckpt: Path) -> list[dict[str, Any]]:
    """Epistemic ratio and AUROC of the held-out photos against the seen validation crops, per t, and the cost."""
    dm = datamodule_of(read_checkpoint(ckpt))
    dm.setup("fit")
    seen, held = stacked(dm.val_dataset, MAX_IMAGES), stacked(dm.heldout_dataset, MAX_IMAGES)
    rows = score(label, denoiser.predict, denoiser.schedule, seen, held, None)
    cost = cost_ratios({label: denoiser.predict}, denoiser.model.net)[label]
    return [{**row, "cost_vs_forward": cost, "n_seen": len(seen), "n_heldout": len(held)} for row in rows]


def calibration_rows(label: str, denoiser, data: RealData) -> list[dict[str, Any]]:
    rows = calibration_at_t(denoiser, data.val * 2 - 1, CALIBRATION_T, torch.Generator().manual_seed(0), batch_size=256)
    return [{"run": label, "t": r["t"], "z2_total": r["z2_total"], "mse": r["mse"]} for r in rows]


def peer_set(clipped: bool) -> dict[str, Peer]:
    """Diffusers' 11 configurations of the sampler claims, and with ``clipped`` each one's x0-clipping twin."""
    peers = dict(first_11())
    if clipped:
        peers.update({f"{name}, clip": replace(peer, clip=True) for name, peer in first_11().items()})
    return peers


def sampler_rows(label: str, denoiser, seed: int, args: argparse.Namespace, references: dict, ours: bool) -> list[dict]:
    """One row per (NFE, configuration): ours (``--nfe``, with x0 clipping, ``--recipes``) when ``ours``, and diffusers', on the
    same per-sample noise."""
    rows, n = [], args.n
    x_T = NoiseSource(seed, range(n)).draw(tuple(denoiser.image_shape))  # the same per-sample noise as run_ours
    for nfe in args.nfes:
        recipes = {f"--nfe {nfe}": recipe_for_budget(nfe)}
        if ours and args.clipped:
            clipped = recipe_for_budget(nfe)
            clipped.callbacks = [ClipX0(), *clipped.callbacks]
            recipes[f"--nfe {nfe} + clip_x0"] = clipped
        for path in args.recipes if ours else ():
            recipe = load_recipe(path)
            if recipe.steps == nfe:
                recipes[f"recipe {path.stem}"] = recipe
        for name, recipe in recipes.items() if ours else ():
            samples = run_ours(recipe, denoiser, n, seed, args.batch)
            filters = {"uncertainty": sample_score(samples.images, samples.variance)}
            rows.append({"run": label, "seed": seed, "nfe": nfe, "sampler": name,
                         **score_row(samples.images, references, filters)})
        for name, peer in peer_set(args.clipped).items():
            samples = run_peer(peer, nfe, denoiser, x_T, args.batch)
            rows.append({"run": label, "seed": seed, "nfe": nfe, "sampler": name,
                         **score_row(samples.images, references, {})})
        print(f"{label} seed {seed} nfe {nfe}: done", flush=True)
    return rows


def bar_summary(rows: list[dict], spaces: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per run, seed and NFE: ``--nfe``'s FD over the best diffusers configuration's, per space."""
    out = []
    keys = sorted({(r["run"], r["seed"], r["nfe"]) for r in rows})
    for run, seed, nfe in keys:
        cell = [r for r in rows if (r["run"], r["seed"], r["nfe"]) == (run, seed, nfe)]
        row: dict[str, Any] = {"run": run, "seed": seed, "nfe": nfe}
        for space in spaces:
            peers = [r for r in cell if not r["sampler"].startswith(("--nfe", "recipe "))]
            best = min(peers, key=lambda r: r[f"{space}/fd"])
            row[f"{space}/best_peer_fd"] = best[f"{space}/fd"]
            row[f"{space}/best_peer"] = best["sampler"]
            for ours in (r for r in cell if r["sampler"].startswith("--nfe")):
                key = "nfe_clip" if "clip" in ours["sampler"] else "nfe"
                row[f"{space}/{key}_fd"] = ours[f"{space}/fd"]
                row[f"{space}/{key}_vs_best"] = ours[f"{space}/fd"] / best[f"{space}/fd"]
                row[f"{space}/{key}_filter_ratio"] = ours.get(f"{space}/filter_uncertainty", math.nan)
            for ours in (r for r in cell if r["sampler"].startswith("recipe ")):
                name = ours["sampler"].removeprefix("recipe ")
                row[f"{space}/{name}_fd"] = ours[f"{space}/fd"]
                row[f"{space}/{name}_vs_best"] = ours[f"{space}/fd"] / best[f"{space}/fd"]
                row[f"{space}/{name}_filter_ratio"] = ours.get(f"{space}/filter_uncertainty", math.nan)
        out.append(row)
    return out


def add_ddpm_ratio(summary: list[dict[str, Any]], spaces: tuple[str, ...]) -> None:
    """On each default run's summary row: its best diffusers configuration's FD over the same-label plain DDPM's best,
    per space (the same configurations on both networks, the same sampling seed and NFE: the network claim "the
    default vs the plain DDPM at equal time")."""
    ddpm = {(r["run"].removeprefix("ddpm "), r["seed"], r["nfe"]): r for r in summary if r["run"].startswith("ddpm ")}
    for row in summary:
        twin = ddpm.get((row["run"], row["seed"], row["nfe"]))
        if twin is None or row["run"].startswith("ddpm "):
            continue
        for space in spaces:
            row[f"{space}/best_vs_ddpm"] = row[f"{space}/best_peer_fd"] / twin[f"{space}/best_peer_fd"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", nargs="+", required=True, help="label=checkpoint:seed[,seed] of default runs")
    parser.add_argument("--ddpm", nargs="*", default=[], help="label=checkpoint of plain-DDPM runs (sampling seeds of --run)")
    parser.add_argument("--n", type=int, default=2000, help="samples per configuration")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--nfes", type=int, nargs="+", default=list(NFES), help="denoiser calls per sample")
    parser.add_argument("--clipped", action="store_true",
                        help="also every configuration with its x0 estimate clipped to the data range (ClipX0; diffusers' "
                             "clip_sample / thresholding)")
    parser.add_argument("--skip-samplers", action="store_true", help="only the held-out and calibration claims")
    parser.add_argument("--recipes", type=Path, nargs="*", default=[],
                        help="sampler recipe files to run beside --nfe, each at the budget of its own steps")
    parser.add_argument("--skip-claims", action="store_true", help="only the samplers (no held-out or calibration claims)")
    parser.add_argument("--stem", default="photos_claims")
    args = parser.parse_args()
    runs = [parse_run(item) for item in args.run]
    data = RealData.of_datamodule(datamodule_of(read_checkpoint(runs[0][1])))
    ensure_feature_nets(data.default_spaces, data=data)
    references = references_for(data.default_spaces, data=data)
    heldout, calibration, samplers = [], [], []
    for label, ckpt, seeds in runs:
        denoiser = load_model(ckpt).eval()
        if not args.skip_claims:
            heldout += heldout_rows(label, denoiser, ckpt)
            calibration += calibration_rows(label, denoiser, data)
        for seed in [] if args.skip_samplers else seeds:
            samplers += sampler_rows(label, denoiser, seed, args, references, ours=True)
    for item in args.ddpm:
        label, _, ckpt = item.partition("=")
        denoiser = load_model(ckpt).eval()
        if not args.skip_claims:  # its held-out noise MSE per t beside the default's (z^2 means nothing here)
            calibration += calibration_rows(f"ddpm {label}", denoiser, data)
        for seed in [] if args.skip_samplers else sorted({s for _, _, seeds in runs for s in seeds}):
            samplers += sampler_rows(f"ddpm {label}", denoiser, seed, args, references, ours=False)
    summary = bar_summary(samplers, data.default_spaces) if samplers else []
    add_ddpm_ratio(summary, data.default_spaces)
    payload = {"data_key": data.key, "classes": data.class_names, "n": args.n, "heldout": heldout,
               "calibration": calibration, "samplers": samplers, "summary": summary}
    columns = ["run", "seed", "nfe"] + [f"{s}/{k}" for s in data.default_spaces
                                        for k in ("best_peer", "best_peer_fd", "nfe_fd", "nfe_vs_best", "nfe_clip_fd",
                                                  "nfe_clip_vs_best", "nfe_clip_filter_ratio",
                                                  *(f"{p.stem}_{k}" for p in args.recipes
                                                    for k in ("fd", "vs_best", "filter_ratio")), "best_vs_ddpm")]
    write_results(RESULTS, args.stem, payload, summary, columns)
    for row in heldout:
        print(f"{row['design']} t={row['t']}: ratio {row['ratio']:.2f} auroc {row['auroc']:.3f} "
              f"cost {row['cost_vs_forward']:.2f}x")
    for row in calibration:
        print(f"{row['run']} t={row['t']}: z2 {row['z2_total']:.3f} noise mse {row['mse']:.4f}")


if __name__ == "__main__":
    main()
