"""Denoiser quality: the posterior-mean network of each checkpoint, sampled by diffusers' own schedulers.

    python benchmarks/denoiser_quality.py \
        --ckpt hybrid@0=runs/.../last.ckpt hybrid@1=... ddpm@0=... ddpm@1=... \
        --baseline ddpm [--n 2000] [--seeds 0 1 2] [--nfe 20 50] [--stem denoiser_quality] [--append]

This isolates the *network* (objective, size, steps) from our sampler: every model is sampled
with the same diffusers DPM-Solver++(2M) on every grid diffusers offers (leading, linspace,
trailing, Karras sigmas), from the same per-sample noise (sample i depends only on (seed, i)).
Quality is reported in three feature spaces built differently (``bdiff.metrics.features``:
the digits CNN classifier, a fully connected classifier from another seed, raw pixels), with
KID, precision/recall and the classifier's confidence. Calibration of the predicted variances:
z^2 = E[(eps - eps_hat)^2 / Var] on the held-out digits per t (ideal 1).

Labels are ``name@training_seed``; with ``--baseline NAME [NAME ...]`` every model's best-grid FD
is also divided by each baseline's at the same training seed, per space and NFE (and, with
several sampling seeds, the mean over seeds by the baseline's mean). Writes
``benchmarks/results/<stem>.json`` and ``<stem>.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from bdiff.bayes.recalibration import FINAL_DRAWS, default_knots, fit_calibration, knot_errors
from bdiff.checkpoint import load_model
from bdiff.datasets import digits_split
from bdiff.metrics.calibration import calibration_at_t
from bdiff.metrics.features import DIGITS_SPACES
from bdiff.metrics.report import markdown_table, quality_in_spaces
from bdiff.sampling.noise import NoiseSource
from common import RESULTS, references_for, write_results
from peers import GRIDS, Peer, run_peer
CALIBRATION_T = (10, 50, 100, 250, 500, 750)
# Noise draws per held-out image and t when scoring z^2. One draw (the first ones written here)
# is a noisy estimate: over 8 draws the recalibrated z^2 at t = 10 has an sd of 0.06-0.07 on
# the 10-minute default, so a single draw can read 1.14 where the mean is 1.02.
CALIBRATION_DRAWS = 8
SOLVER = "diffusers-dpm++2m"


def parse_ckpts(items: list[str]) -> dict[str, Path]:
    """``name@seed=path`` -> {label: path}, with a clear error for a malformed item or a missing file."""
    out = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or "@" not in label:
            raise SystemExit(f"error: --ckpt takes name@training_seed=path, got {item!r}")
        if not Path(path).is_file():
            raise SystemExit(f"error: checkpoint {path!r} (for {label}) does not exist")
        out[label] = Path(path)
    return out


def sample_rows(label: str, ckpt: Path, args: argparse.Namespace, references: dict) -> list[dict[str, Any]]:
    """One row per (sampling seed, NFE, grid): quality in every space."""
    denoiser = load_model(ckpt, weights="current" if label in args.current_weights else "average")
    rows = []
    for seed in args.seeds:
        x_T = NoiseSource(seed, range(args.n)).draw(tuple(denoiser.image_shape))
        for nfe in args.nfe:
            for grid in args.grids:
                samples = run_peer(Peer.from_label(f"{SOLVER}, {grid}"), nfe, denoiser, x_T, args.batch)
                spaces = quality_in_spaces(samples.images, references)
                row = {"model": label, "seed": seed, "nfe": nfe, "grid": grid, "seconds": samples.seconds}
                for space, q in spaces.items():
                    row.update({f"{space}/{k}": v for k, v in q.items()})
                rows.append(row)
                print(f"{label:14s} seed {seed} NFE {nfe:3d} {grid:9s} "
                      + "  ".join(f"{s} FD {q['fd']:.3f} P {q['precision']:.2f}" for s, q in spaces.items()), flush=True)
    return rows


def calibration_rows(label: str, ckpt: Path, denoiser=None, draws: int = CALIBRATION_DRAWS) -> list[dict[str, Any]]:
    """z^2 per t on the held-out digits: of the variance head as trained, and after the per-t
    recalibration (bdiff.bayes.recalibration) fitted on the *other* half of the held-out digits
    (two-fold cross-fitting, so no image is scored by a calibration fitted on it).

    The recalibrated z^2 is the mean over ``draws`` noise draws per image (sampling seeds
    0..draws-1, so draw 0 is the single draw earlier tables used), with its standard error
    over draws and draw 0's value beside it.
    ``denoiser``: score this one (e.g. with a bottleneck GP attached) instead of loading ``ckpt``."""
    denoiser = load_model(ckpt) if denoiser is None else denoiser
    denoiser.calibration = None  # the stored one was fitted on all of these images
    x0 = digits_split("val") * 2 - 1
    rows = calibration_at_t(denoiser, x0, CALIBRATION_T, torch.Generator().manual_seed(0))
    halves = (torch.arange(len(x0)) % 2 == 0, torch.arange(len(x0)) % 2 == 1)
    knots = default_knots(denoiser.schedule.timesteps)
    fits = []
    for fit_on, score_on in (halves, halves[::-1]):
        errors = knot_errors(denoiser.predict_uncalibrated, denoiser.schedule, x0[fit_on], knots,
                             torch.Generator().manual_seed(1), draws=FINAL_DRAWS)
        fits.append((fit_calibration(knots, errors), score_on))
    per_draw: dict[int, list[float]] = {t: [] for t in CALIBRATION_T}
    for draw in range(draws):
        pooled: dict[int, list[tuple[int, float]]] = {t: [] for t in CALIBRATION_T}
        for calibration, score_on in fits:
            denoiser.calibration = calibration
            for r in calibration_at_t(denoiser, x0[score_on], CALIBRATION_T, torch.Generator().manual_seed(draw)):
                pooled[r["t"]].append((r["num_pixels"], r["z2_total"]))
        for t, n_z in pooled.items():
            per_draw[t].append(sum(n * z for n, z in n_z) / sum(n for n, _ in n_z))
    denoiser.calibration = None
    out = []
    for r in rows:
        z = torch.tensor(per_draw[r["t"]], dtype=torch.float64)
        se = float(z.std() / len(z) ** 0.5) if len(z) > 1 else float("nan")
        out.append({"model": label, "z2_total_recalibrated": float(z.mean()), "z2_recalibrated_se": se,
                    "z2_recalibrated_draw0": float(z[0]), "calibration_draws": draws,
                    **{k: r.get(k) for k in ("t", "mse", "z2_total", "z2_aleatoric", "mean_var_epistemic")}})
    return out


def ratio_suffix(baselines: list[str], baseline: str) -> str:
    """Column suffix of the ratios to ``baseline``: none for the first of ``baselines``, else ``_<name>``."""
    return "" if baseline == baselines[0] else f"_{baseline}"


def attach_ratios(table: dict[tuple, dict[str, Any]], spaces: tuple[str, ...], baselines: list[str]) -> None:
    """Add to each entry of ``table`` (keyed by (model, ...)) its FD ratio and precision gap to the entry
    of each baseline at the same training seed and the same rest of the key, in place; entries over a
    different number of sampling seeds (``num_seeds``) are not compared."""
    for baseline in baselines:
        suffix = ratio_suffix(baselines, baseline)
        for (model, *rest), e in table.items():
            ref = table.get((f"{baseline}@{model.split('@', 1)[1]}", *rest))
            if ref is None or ref.get("num_seeds") != e.get("num_seeds"):
                continue
            for s in spaces:
                e[f"{s}/fd_ratio{suffix}"] = e[f"{s}/fd"] / ref[f"{s}/fd"]
                e[f"{s}/precision_gap{suffix}"] = e[f"{s}/precision"] - ref[f"{s}/precision"]


def mean_over_seeds(summary: list[dict[str, Any]], spaces: tuple[str, ...], baselines: list[str]) -> list[dict[str, Any]]:
    """Per (model, NFE) over the sampling seeds in ``summary``: the mean of each seed's best-grid FD
    per space, and its ratio to each baseline's mean at the same training seed (seed column "mean of ...")."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for e in summary:
        groups.setdefault((e["model"], e["nfe"]), []).append(e)
    means = {}
    for (model, nfe), entries in groups.items():
        entries = sorted(entries, key=lambda e: e["seed"])
        m = {"model": model, "seed": "mean of " + ",".join(str(e["seed"]) for e in entries),
             "nfe": nfe, "num_seeds": len(entries)}
        for s in spaces:
            m[f"{s}/fd"] = sum(e[f"{s}/fd"] for e in entries) / len(entries)
            m[f"{s}/precision"] = sum(e[f"{s}/precision"] for e in entries) / len(entries)
            m[f"{s}/grid"] = "/".join(e[f"{s}/grid"] for e in entries)
        means[(model, nfe)] = m
    attach_ratios(means, spaces, baselines)
    return list(means.values())


def best_grid_summary(rows: list[dict[str, Any]], spaces: tuple[str, ...], baselines: list[str]) -> list[dict[str, Any]]:
    """Per (model, sampling seed, NFE): the best grid's FD in each space (the peer at its strongest), and
    the ratio to each baseline at the same training seed (columns ``fd_ratio`` for the first,
    ``fd_ratio_<name>`` for the others)."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r["model"], r["seed"], r["nfe"])
        entry = best.setdefault(key, {"model": r["model"], "seed": r["seed"], "nfe": r["nfe"]})
        for s in spaces:
            fd = r[f"{s}/fd"]
            if fd < entry.get(f"{s}/fd", float("inf")):
                entry[f"{s}/fd"], entry[f"{s}/grid"] = fd, r["grid"]
                entry[f"{s}/precision"] = r[f"{s}/precision"]
    attach_ratios(best, spaces, baselines)
    return list(best.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", nargs="+", required=True, help="name@training_seed=path to a checkpoint")
    p.add_argument("--baseline", nargs="+", default=[],
                   help="model names to divide by (same training seed); the first gives the fd_ratio columns")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds")
    p.add_argument("--nfe", type=int, nargs="+", default=[20, 50])
    p.add_argument("--grids", nargs="+", default=list(GRIDS), choices=GRIDS)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--stem", default="denoiser_quality")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--append", action="store_true", help="keep the other models of an earlier <stem>.json")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 when another job shares the 2 cores)")
    p.add_argument("--current-weights", nargs="+", default=[], metavar="NAME@SEED",
                   help="these --ckpt models sample with the optimizer's own weights, not the EMA average the "
                        "checkpoint ships (load_model(weights='current')); no calibration rows (fitted on the EMA)")
    p.add_argument("--calibration-only", action="store_true",
                   help="with --append: recompute only the calibration rows of these checkpoints (no sampling)")
    args = p.parse_args()
    if args.calibration_only and not args.append:
        raise SystemExit("error: --calibration-only updates an earlier run: add --append")
    torch.set_num_threads(args.threads)

    ckpts = parse_ckpts(args.ckpt)
    if unknown := set(args.current_weights) - set(ckpts):
        raise SystemExit(f"error: --current-weights {sorted(unknown)} are not --ckpt names ({sorted(ckpts)})")
    references = None if args.calibration_only else references_for(DIGITS_SPACES)
    rows, calibration = [], []
    previous = args.out / f"{args.stem}.json"
    if args.append and previous.is_file():  # add models to an earlier run of the same settings
        old = json.loads(previous.read_text())
        if old["n"] != args.n:
            raise SystemExit(f"error: {previous} has n={old['n']}, this run n={args.n}: use another --stem")
        # a (model, sampling seed) run here replaces the earlier one; other seeds are kept
        rows = [r for r in old["rows"] if not (r["model"] in ckpts and r["seed"] in args.seeds)]
        calibration = [r for r in old["calibration"] if r["model"] not in ckpts]
        ckpts = {**{k: Path(v) for k, v in old["ckpts"].items() if k not in ckpts}, **ckpts}
        if args.calibration_only:
            rows = old["rows"]
    for label, path in parse_ckpts(args.ckpt).items():
        if not args.calibration_only:
            rows += sample_rows(label, path, args, references)
        if label not in args.current_weights:
            calibration += calibration_rows(label, path)
    summary = best_grid_summary(rows, DIGITS_SPACES, args.baseline)
    if len({r["seed"] for r in rows}) > 1:
        summary += mean_over_seeds(summary, DIGITS_SPACES, args.baseline)

    columns = ["model", "seed", "nfe"]
    for s in DIGITS_SPACES:
        columns += [f"{s}/fd", f"{s}/grid", f"{s}/precision"]
        columns += [f"{s}/fd_ratio{ratio_suffix(args.baseline, b)}" for b in args.baseline]
    payload = {"ckpts": {k: str(v) for k, v in ckpts.items()}, "n": args.n, "solver": SOLVER,
               "summary": summary, "rows": rows, "calibration": calibration}
    write_results(args.out, args.stem, payload, summary, columns)
    cal = markdown_table(calibration, ["model", "t", "mse", "z2_total", "z2_total_recalibrated", "z2_recalibrated_se",
                                        "z2_recalibrated_draw0", "z2_aleatoric", "mean_var_epistemic"])
    detail_cols = ["model", "seed", "nfe", "grid"] + [f"{s}/{k}" for s in DIGITS_SPACES for k in ("fd", "precision", "recall")]
    detail_cols += ["digits/confidence", "digits_mlp/confidence"]
    with open(args.out / f"{args.stem}.md", "a") as f:
        f.write("\n## Every grid\n\n" + markdown_table(rows, detail_cols) + "\n\n## Calibration (held-out digits)\n\n" + cal + "\n")
    print(cal)


if __name__ == "__main__":
    main()
