"""What the Wiener-filter fallback (sampler callback PriorFusion) does to samples, against the same sampler without it
and against the best diffusers configuration.

    python benchmarks/prior_fusion.py --run B=runs/bdiff/<id>/checkpoints/last.ckpt:1 [--nfes 10] [--n 400] \
        [--with-nfe] [--stem prior_fusion_photos]

For each training run (``label=checkpoint:sampling seed[,seed]``), sampling seed and budget, on the run's own data
(:class:`bdiff.metrics.references.RealData`, rebuilt from the checkpoint) and in its feature spaces:

* three of our steppers on their grids (DDIM trailing, UniPC bh1 leading, DPM-Solver++(2M) trailing), and with
  ``--with-nfe`` the ``--nfe`` recipe, each with and without :class:`~bdiff.sampler_callbacks.PriorFusion`
  first: same stepper, grid and denoiser calls (the callback adds none);
* diffusers' 11 configurations of the sampler claims (:func:`peers.first_11`) and each with its x0 estimate
  clipped to the data range (22): the bar is the best of them per space.

A checkpoint trained before the fallback existed gets it fitted here as ``python -m bdiff.recalibrate`` would
(:func:`bdiff.recalibrate.fit_prior_for_checkpoint`). Writes ``benchmarks/results/<stem>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

import torch
from common import RESULTS, short_recipe, write_results
from peers import first_11, parse_run, run_ours, run_peer
from sampler_claims import score_row

from bdiff.checkpoint import load_model
from bdiff.evaluate import data_of_checkpoint
from bdiff.lit.feature_module import ensure_feature_nets
from bdiff.metrics.references import references_for
from bdiff.recalibrate import fit_prior_for_checkpoint
from bdiff.sampler_callbacks import PriorFusion
from bdiff.sampling.budget import recipe_for_budget
from bdiff.sampling.noise import NoiseSource

BASES: dict[str, dict[str, Any]] = {
    "ddim, trailing": {"stepper": "ddim", "spacing": "trailing"},
    "unipc bh1, leading": {"stepper": {"name": "unipc", "variant": "bh1"}, "spacing": "leading"},
    "dpm++2m, trailing": {"stepper": "dpmpp_2m", "spacing": "trailing"},
}


def sampler_rows(label: str, denoiser, seed: int, nfe: int, args: argparse.Namespace, references: dict) -> list[dict]:
    """One row per configuration at one budget: our bases with and without the fallback, and the 22 peers."""
    rows = []
    recipes = {name: short_recipe({**spec, "steps": nfe}) for name, spec in BASES.items()}
    if args.with_nfe:
        recipes[f"--nfe {nfe}"] = recipe_for_budget(nfe)
    for name, recipe in recipes.items():
        base = list(recipe.callbacks)
        for fused in (False, True):
            recipe.callbacks = [PriorFusion(), *base] if fused else base
            samples = run_ours(recipe, denoiser, args.n, seed, args.batch)
            rows.append({"run": label, "seed": seed, "nfe": nfe, "sampler": name, "fusion": fused, "peer": False,
                         **score_row(samples.images, references, {})})
    x_T = NoiseSource(seed, range(args.n)).draw(tuple(denoiser.image_shape))  # the same per-sample noise as ours
    for name, peer in first_11().items():
        for clip in (False, True):
            samples = run_peer(replace(peer, clip=clip), nfe, denoiser, x_T, args.batch)
            rows.append({"run": label, "seed": seed, "nfe": nfe, "sampler": name + (", clip" if clip else ""),
                         "fusion": False, "peer": True, **score_row(samples.images, references, {})})
    print(f"{label} seed {seed} nfe {nfe}: done", flush=True)
    return rows


def summary(rows: list[dict], spaces: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per run, seed, budget and base: FD with the fallback over FD without it, and the best fused configuration's FD
    over the best peer's, per space."""
    out = []
    for key in sorted({(r["run"], r["seed"], r["nfe"]) for r in rows}):
        cell = [r for r in rows if (r["run"], r["seed"], r["nfe"]) == key]
        ours, peers = [r for r in cell if not r["peer"]], [r for r in cell if r["peer"]]
        for name in dict.fromkeys(r["sampler"] for r in ours):
            plain = next(r for r in ours if r["sampler"] == name and not r["fusion"])
            fused = next(r for r in ours if r["sampler"] == name and r["fusion"])
            row: dict[str, Any] = {"run": key[0], "seed": key[1], "nfe": key[2], "sampler": name}
            for space in spaces:
                best = min(peers, key=lambda r: r[f"{space}/fd"])
                row[f"{space}/fd"] = plain[f"{space}/fd"]
                row[f"{space}/fd_fused"] = fused[f"{space}/fd"]
                row[f"{space}/fused_vs_plain"] = fused[f"{space}/fd"] / plain[f"{space}/fd"]
                row[f"{space}/fused_vs_best_peer"] = fused[f"{space}/fd"] / best[f"{space}/fd"]
                row[f"{space}/best_peer"] = best["sampler"]
            first = spaces[0]
            row["precision_recall"] = (f"{plain[f'{first}/precision']:.2f}/{plain[f'{first}/recall']:.2f} -> "
                                       f"{fused[f'{first}/precision']:.2f}/{fused[f'{first}/recall']:.2f}")
            out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", nargs="+", required=True, help="label=checkpoint:seed[,seed] (one data set)")
    parser.add_argument("--n", type=int, default=400, help="samples per configuration")
    parser.add_argument("--batch", type=int, default=400)
    parser.add_argument("--nfes", type=int, nargs="+", default=[10], help="denoiser calls per sample")
    parser.add_argument("--with-nfe", action="store_true", help="also the --nfe recipe (its grid is fitted per run)")
    parser.add_argument("--stem", default="prior_fusion")
    args = parser.parse_args()
    runs = [parse_run(item) for item in args.run]
    data = data_of_checkpoint(runs[0][1])
    ensure_feature_nets(data.default_spaces, data=data)
    references = references_for(data.default_spaces, data=data)
    rows, weights = [], {}
    for label, ckpt, seeds in runs:
        denoiser = load_model(ckpt).eval()
        if denoiser.prior is None:
            denoiser.prior, denoiser.prior_weight = fit_prior_for_checkpoint(ckpt, denoiser)
        weights[label] = denoiser.prior_weight.to_dict()
        for seed in seeds:
            for nfe in args.nfes:
                rows += sampler_rows(label, denoiser, seed, nfe, args, references)
    table = summary(rows, data.default_spaces)
    columns = ["run", "seed", "nfe", "sampler", "precision_recall"] + [
        f"{s}/{k}" for s in data.default_spaces for k in ("fd", "fd_fused", "fused_vs_plain", "fused_vs_best_peer")]
    write_results(RESULTS, args.stem, {"data_key": data.key, "n": args.n, "prior_weight": weights, "rows": rows,
                                       "summary": table}, table, columns)
    for space in data.default_spaces:
        for label in weights:
            for seed in sorted({r["seed"] for r in rows if r["run"] == label}):
                peers = [r for r in rows if r["peer"] and r["run"] == label and r["seed"] == seed]
                best = min(peers, key=lambda r: r[f"{space}/fd"])
                print(f"{label} seed {seed} {space}: best peer {best['sampler']} FD {best[f'{space}/fd']:.4g}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
