"""Where does the posterior pay? Each mechanism that reads it, against the same sampler without it, per regime.

    python benchmarks/where_uncertainty_pays.py --run full@1=<ckpt> frac10@1=<ckpt> --seeds 0 2 --nfe 5 10 20 \
        --peers --stem where_uncertainty_pays

A run is ``regime@training-seed=checkpoint``; the regimes are trainings where a model is unsure
(``--data.fraction 0.1``, ``--data.class_fraction``, an early checkpoint), beside the full-data default.
A checkpoint without an epistemic error scale (trained before it existed) gets one fitted in memory
(:func:`bdiff.recalibrate.fit_for_checkpoint`), as ``python -m bdiff.recalibrate`` would store it.

Per run, sampling seed and budget N, every family spends at most N denoiser calls per *kept* sample:

- ``base``: the ``--nfe N`` recipe (:func:`bdiff.sampling.budget.recipe_for_budget`), no posterior used;
- ``blend``, ``adaptive``, ``refine``: the same recipe plus variance-weighted blending, split steps, or one
  refinement pass (:data:`MECHANISMS`), each reading the epistemic variance in the units of the mean's error,
  so each is the base wherever r(t) = 0; adaptive and refinement may add calls (their mean is ``nfe_used``),
  so adaptive is also compared with the ``--nfe`` recipe at N + its most extra calls (``base_more_calls``);
- ``keep{F}`` / ``keep{F}_leading``: ``round(F N)`` steps of the ``--nfe`` recipe / of UniPC on the
  leading grid, n / F samples drawn and the n most certain kept by the shipped score
  (:func:`bdiff.metrics.usefulness.sample_score`): ``bdiff.sample --keep F``, for F in 0.8 and 0.5;
- ``free``: the best uncertainty-free configuration within N calls, per space: the least FD over the
  ``--nfe`` recipe and UniPC on the leading grid at round(F N) and N steps (the first n samples of
  the keep draws) and, with ``--peers``, diffusers' first 11 configurations at the same step counts;
- filtering ``base``'s samples: drop the 20% least certain by the shipped score (and by the raw mean
  variance) vs a random 20% (mean of 5 draws): FD, precision, recall and classifier error per space.

Writes ``benchmarks/results/<stem>.json`` and ``.md`` (the ratios per cell and space).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from bdiff.checkpoint import load_model
from bdiff.metrics.features import DIGITS_SPACES
from bdiff.metrics.frechet import extract_features
from bdiff.metrics.report import classifier_confidence, filtering_in_spaces, quality_from_features
from bdiff.metrics.samples_file import SampleSet
from bdiff.metrics.usefulness import per_sample_uncertainty, sample_score
from bdiff.recalibrate import fit_for_checkpoint
from bdiff.sampling.budget import recipe_for_budget
from bdiff.sampling.recipe import Recipe, load_recipe
from common import RESULTS, references_for, short_recipe, write_results
from peers import first_11, run_ours, run_peer

KEEPS = (0.8, 0.5)  # --keep fractions measured
DROP = 0.2  # the filter's share of a batch


def quality(images: torch.Tensor, references: dict[str, Any]) -> dict[str, float]:
    """{space/fd, space/precision, space/recall, space/error} of images (N,C,H,W) in [0, 1]."""
    out = {}
    for space, (extractor, f_real) in references.items():
        q = quality_from_features(f_real, extract_features(images, extractor), kid_subset=100)
        out.update({f"{space}/{k}": q[k] for k in ("fd", "precision", "recall")})
        confidence = classifier_confidence(images, extractor)
        if confidence is not None:
            out[f"{space}/error"] = 1 - confidence
    return out


def filtering(samples: SampleSet, references: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Quality after dropping the 20% least certain (shipped score; raw mean variance) and a random 20%:
    {"drop_score": {space/metric: ...}, "drop_raw": ..., "drop_random": ...}."""
    out: dict[str, dict[str, float]] = {"drop_score": {}, "drop_raw": {}, "drop_random": {}}
    for name, score in (("score", sample_score(samples.images, samples.variance)),
                        ("raw", per_sample_uncertainty(samples.variance))):
        for space, row in filtering_in_spaces(samples.images, score, references, drop=DROP).items():
            for key, value in row.items():
                metric, _, which = key.rpartition("_")
                out["drop_random" if which == "random" else f"drop_{name}"][f"{space}/{metric}"] = value
    return out


def kept(drawn: SampleSet, n: int) -> SampleSet:
    """The n samples of ``drawn`` the shipped score ranks most certain, NFE counted per kept sample."""
    order = sample_score(drawn.images, drawn.variance).argsort(stable=True)[:n]
    return SampleSet(drawn.images[order], drawn.variance[order], drawn.nfe * len(drawn.images) / n, drawn.seconds,
                     drawn.config)


def first(drawn: SampleSet, n: int) -> SampleSet:
    """The first n samples of ``drawn`` (plain sampling: sample i depends only on the seed and i)."""
    return SampleSet(drawn.images[:n], drawn.variance[:n], drawn.nfe, drawn.seconds, drawn.config)


MECHANISMS: dict[str, tuple[str, dict[str, Any]]] = {
    "blend": ("VarianceWeightedBlending", {"strength": 1.0}),
    "adaptive": ("AdaptiveStepSize", {"tol": 0.2, "max_extra_nfe": 2}),
    "refine": ("UncertainRegionRefinement", {"tol": 0.5, "jump": 50, "t_range": [50, 600], "max_passes": 1}),
}
"""The posterior-driven callbacks added to the ``--nfe`` recipe, each reading the mean's stated error (not tuned:
blending as derived, the adaptive tolerance of its 10-NFE setting, refinement at half the remaining noise)."""


def with_mechanism(recipe: Recipe, name: str) -> Recipe:
    """``recipe`` with the callback :data:`MECHANISMS` ``[name]`` appended."""
    class_path, init_args = MECHANISMS[name]
    spec = dict(recipe.config)
    spec["callbacks"] = [*(spec.get("callbacks") or []), {"class_path": class_path, "init_args": dict(init_args)}]
    return load_recipe(spec, name=f"{recipe.name}+{name}")


def leading(steps: int) -> Recipe:
    return short_recipe({"stepper": "unipc", "steps": steps, "spacing": "leading"}, name=f"unipc-leading-{steps}")


def best_of(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per metric, the best value over ``rows``: least FD and error, most precision and recall."""
    return {k: (max if k.endswith(("/precision", "/recall")) else min)(r[k] for r in rows) for k in rows[0]}


def run_cells(label: str, ckpt: Path, seeds: list[int], budgets: list[int], n: int, peers: bool, batch: int,
              references: dict[str, Any], mechanisms_only: bool = False) -> list[dict[str, Any]]:
    denoiser = load_model(ckpt)
    if denoiser.error_scale is None:
        denoiser.error_scale = fit_for_checkpoint(ckpt, denoiser)
    regime, _, train_seed = label.partition("@")
    rows = []
    for seed in seeds:
        for nfe in budgets:
            cell = {"regime": regime, "train_seed": train_seed, "seed": seed, "nfe": nfe}
            base_recipe = recipe_for_budget(nfe)
            base = run_ours(base_recipe, denoiser, n, seed, batch)
            found = {"base": {**quality(base.images, references), "nfe_used": base.nfe}}
            for name in MECHANISMS:
                drawn = run_ours(with_mechanism(base_recipe, name), denoiser, n, seed, batch)
                found[name] = {**quality(drawn.images, references), "nfe_used": drawn.nfe}
            more = recipe_for_budget(nfe + MECHANISMS["adaptive"][1]["max_extra_nfe"])  # adaptive's most calls, no posterior
            drawn = run_ours(more, denoiser, n, seed, batch)
            found["base_more_calls"] = {**quality(drawn.images, references), "nfe_used": drawn.nfe}
            if mechanisms_only:
                rows += [{**cell, "family": name, **q} for name, q in found.items()]
                continue
            free = [found["base"], quality(run_ours(leading(nfe), denoiser, n, seed, batch).images, references)]
            for fraction in KEEPS:
                steps = max(1, round(fraction * nfe))
                for name, recipe in (("", recipe_for_budget(steps)), ("_leading", leading(steps))):
                    drawn = run_ours(recipe, denoiser, math.ceil(n / fraction), seed, batch)
                    found[f"keep{fraction}{name}"] = quality(kept(drawn, n).images, references)
                    free.append(quality(first(drawn, n).images, references))
            if peers:
                x_T = torch.randn((n, *denoiser.image_shape), generator=torch.Generator().manual_seed(seed))
                for steps in sorted({nfe, *(max(1, round(f * nfe)) for f in KEEPS)}):
                    free += [quality(run_peer(p, steps, denoiser, x_T, batch).images, references)
                             for p in first_11().values()]
            found["free"] = best_of(free)
            for name, q in {**found, **filtering(base, references)}.items():
                rows.append({**cell, "family": name, **q})
            print(f"{label} seed {seed} nfe {nfe}: " + ", ".join(
                f"{r['family']} {r['digits/fd']:.3g}" for r in rows if r["seed"] == seed and r["nfe"] == nfe), flush=True)
    return rows


def ratios(rows: list[dict[str, Any]], spaces: list[str], keep_variant: str | None = None) -> list[dict[str, Any]]:
    """Per cell and space: blend / base; the keep variant (``keep_variant``, else the best) / the best
    uncertainty-free configuration within the budget (the least ``free`` FD over this cell's budget and every
    smaller one measured: fewer calls fit a budget too); the shipped score's filter against a random drop
    (FD ratio, precision difference, classifier-error ratio)."""
    out = []
    cells = sorted({(r["regime"], r["train_seed"], r["seed"], r["nfe"]) for r in rows})
    for cell in cells:
        by = {r["family"]: r for r in rows if (r["regime"], r["train_seed"], r["seed"], r["nfe"]) == cell}
        within = [r for r in rows if r["family"] == "free" and (r["regime"], r["train_seed"], r["seed"]) == cell[:3]
                  and r["nfe"] <= cell[3]]
        row = dict(zip(("regime", "train_seed", "seed", "nfe"), cell))
        for name in MECHANISMS:
            if name in by and "nfe_used" in by[name]:
                row[f"{name} nfe"] = by[name]["nfe_used"]
        for space in spaces:
            fd = f"{space}/fd"
            for name in (m for m in MECHANISMS if m in by):
                row[f"{space} {name}/base"] = by[name][fd] / by["base"][fd]
            if "base_more_calls" in by:  # adaptive against the --nfe recipe with as many calls as it may take
                row[f"{space} adaptive/more calls"] = by["adaptive"][fd] / by["base_more_calls"][fd]
            keeps = {name: r[fd] for name, r in by.items() if name.startswith("keep")}
            if not keeps:  # --mechanisms-only
                continue
            best_keep = f"keep{keep_variant}" if keep_variant else min(keeps, key=keeps.get)
            row[f"{space} keep/free"] = f"{keeps[best_keep] / min(r[fd] for r in within):.3g} ({best_keep[4:]})"
            row[f"{space} filter fd"] = by["drop_score"][fd] / by["drop_random"][fd]
            row[f"{space} filter Δprec"] = by["drop_score"][f"{space}/precision"] - by["drop_random"][f"{space}/precision"]
            if f"{space}/error" in by["base"]:
                row[f"{space} filter err"] = by["drop_score"][f"{space}/error"] / by["drop_random"][f"{space}/error"]
        out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", nargs="+", default=[], help="regime@training-seed=checkpoint")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 2])
    p.add_argument("--nfe", nargs="+", type=int, default=[5, 10, 20])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--peers", action="store_true", help="also the best of diffusers' first 11 configurations")
    p.add_argument("--keep-variant", default=None, choices=[f"{f}{b}" for f in KEEPS for b in ("", "_leading")],
                   help="the keep variant the ratios report (chosen on another run); default: the best per cell")
    p.add_argument("--stem", default="where_uncertainty_pays")
    p.add_argument("--mechanisms-only", action="store_true",
                   help="only the base recipe and each mechanism of MECHANISMS (no --keep, free bar or filtering)")
    p.add_argument("--table-only", action="store_true", help="recompute the ratios of <stem>.json's rows; sample nothing")
    args = p.parse_args()
    if args.table_only:
        rows = json.loads((RESULTS / f"{args.stem}.json").read_text())["rows"]
        spaces = sorted({k.split("/")[0] for k in rows[0] if k.endswith("/fd")}, key=list(DIGITS_SPACES).index)
    else:
        references = references_for()
        rows = []
        for item in args.run:
            label, _, path = item.partition("=")
            rows += run_cells(label, Path(path), args.seeds, args.nfe, args.n, args.peers, args.batch, references,
                              args.mechanisms_only)
        spaces = list(references)
    table = ratios(rows, spaces, args.keep_variant)
    columns = ["regime", "train_seed", "seed", "nfe"] + [c for c in table[0] if c.split(" ")[0] in spaces
                                                         or c.endswith(" nfe")]
    write_results(RESULTS, args.stem, {"rows": rows, "ratios": table}, table, columns)


if __name__ == "__main__":
    main()
