"""Does the sampler use the new epistemic variance? Blending and ranking with and without the bottleneck GP.

    python benchmarks/epistemic_sampler.py --runs A=runs/bdiff/hlppwji9 B=runs/bdiff/zwj3ik1j --seeds 0 2 --n 1000

For each training run the bottleneck GP (:mod:`bdiff.bayes.bottleneck_gp`) is fitted post hoc on
the training digits with the final EMA weights (what ``model.epistemic_gp: true`` does at every
validation). Per budget (5, 10, 20 NFE): the ``--nfe`` recipe (:mod:`bdiff.sampling.budget`) and
the same recipe plus variance-weighted blending (with ``--adaptive-and-refine`` also plus adaptive
steps, and plus one refinement pass of the uncertain pixels with one solver step fewer), each with the
head's epistemic variance alone
(``head``) and with the GP's added (``gp``). Per feature space (``common.references_for``):
FD, precision, recall; blending's Kalman gain (mean, and per step from the noisiest); the calibration of the total variance on
held-out digits (z^2 per t after the per-t recalibration, cross-fitted as in ``denoiser_quality.py``); and the ranking only epistemic can serve:
AUROC of each sample's propagated uncertainty (mean of its variance map) for the 20% of samples
farthest from any real digit (nearest-real distance in that space), and, in classifier spaces,
for the 20% the classifier is least confident on; and filtering: FD after dropping the 20% most
uncertain over FD after dropping a random 20% (ranked raw, and within clusters of look-alikes as
``bdiff.metrics.usefulness.uncertainty_within_clusters``). Nothing here is tuned (blend strength 1, the
GP's settings from the held-out-class benchmark), so every run and seed is a report.

Writes ``benchmarks/results/epistemic_sampler.json`` and ``.md`` (and ``_calibration.md``).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from bdiff.bayes.bottleneck_gp import BottleneckGP
from bdiff.bayes.recalibration import FINAL_DRAWS, default_knots, fit_calibration, knot_errors
from bdiff.checkpoint import load_model
from bdiff.datasets import digits_split
from bdiff.metrics.frechet import extract_features
from bdiff.metrics.report import quality_from_features
from bdiff.metrics.usefulness import (
    auroc_worst,
    fd_after_filtering,
    nearest_real_distance,
    per_sample_uncertainty,
    uncertainty_within_clusters,
)
from bdiff.sampling.budget import recipe_for_budget
from bdiff.sampler_callbacks import BlendOutput
from bdiff.sampling.recipe import Recipe, load_recipe
from common import RESULTS, ROOT, recipe_file, references_for, write_results
from denoiser_quality import calibration_rows
from peers import run_ours


ADAPTIVE_TOL = {5: 0.25, 10: 0.2, 20: 0.15}
"""The adaptive step controller's tolerance per budget (the adaptive recipe's, no longer shipped: it made FD worse)."""
EXTRA_CALLS = 2
"""Split steps the adaptive controller may add per sample."""


def recipes(nfe: int, extra: bool = False) -> dict[str, Recipe]:
    """The budget's recipe and the same with blending; with ``extra`` also with adaptive steps (at most
    ``EXTRA_CALLS`` split steps) and with one refinement pass of the pixels whose stated error is large. Each is the
    budget's recipe plus the callback: identical to it where the model states no error, at most ``EXTRA_CALLS``
    (adaptive) or 1 (refinement) calls more where it does (the rows' ``nfe`` is the mean)."""
    base = recipe_for_budget(nfe)
    data = base.config
    out = {"recipe": base}

    def plus(name: str, callback: dict[str, Any], steps: int) -> None:
        spec = {**data, "steps": steps, "callbacks": [*(data.get("callbacks") or []), *recipe_file(
            {"stepper": "ddim", "callbacks": [callback]})["callbacks"]]}
        out[f"recipe+{name}"] = load_recipe(spec, name=f"{base.name}+{name}")

    plus("blend", {"name": "blend", "strength": 1.0}, nfe)
    if extra:
        plus("adaptive", {"name": "adaptive", "tol": ADAPTIVE_TOL.get(nfe, 0.2), "max_extra_nfe": EXTRA_CALLS}, nfe)
        plus("refine", {"name": "refine", "tol": 0.5, "jump": 50, "t_range": [50, 600], "max_passes": 1}, nfe)
    return out


def score(images: torch.Tensor, variance: torch.Tensor, references: dict) -> dict[str, float]:
    """Quality and ranking metrics of samples (N,C,H,W) in [0,1] with their variance maps, per space."""
    row: dict[str, float] = {}
    u = per_sample_uncertainty(variance)
    u_cluster = uncertainty_within_clusters(images, variance)
    for space, (extractor, f_real) in references.items():
        f_fake = extract_features(images, extractor)
        q = quality_from_features(f_real, f_fake)
        row.update({f"{space}/{k}": q[k] for k in ("fd", "precision", "recall")})
        row[f"{space}/auroc_far"] = auroc_worst(u, nearest_real_distance(f_fake, f_real))
        for key, score_ in (("filter", u), ("filter_clusters", u_cluster)):
            f = fd_after_filtering(f_real, f_fake, score_, drop=0.2, seeds=range(5))
            row[f"{space}/{key}"] = f["fd_drop_uncertain"] / f["fd_drop_random_mean"]
        if getattr(extractor, "is_classifier", False):
            conf = torch.cat([extractor.confidence(c) for c in images.split(1000)])
            row[f"{space}/auroc_unsure"] = auroc_worst(u, -conf)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="LABEL=run folder (with checkpoints/last.ckpt)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 2])
    p.add_argument("--adaptive-and-refine", action="store_true",
                   help="also the recipe with adaptive steps and with one refinement pass (the budget kept)")
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stem", default="epistemic_sampler")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    references = references_for()
    train_x, val_x = digits_split("train") * 2 - 1, digits_split("val") * 2 - 1
    rows: list[dict[str, Any]] = []
    calibration: list[dict[str, Any]] = []
    for spec in args.runs:
        label, folder = spec.split("=", 1)
        ckpt = ROOT / folder / "checkpoints" / "last.ckpt"
        head = load_model(ckpt)
        head.epistemic_gp = None  # the head's posterior alone, even if the run was trained with the GP
        gp = load_model(ckpt)
        gp.epistemic_gp = BottleneckGP.fit(gp.model, gp.schedule, train_x[:2048].split(256))
        stored = head.calibration
        for epistemic, den in (("head", head), ("gp", gp)):
            calibration += [{"run": label, "epistemic": epistemic, **r}
                            for r in calibration_rows(f"{label}/{epistemic}", ckpt, denoiser=den)]
            print(calibration[-6:], flush=True)
        # Sampling: the head keeps the stored recalibration; with the GP it is refitted on the
        # validation digits with the GP's variance included, as training with model.epistemic_gp does.
        head.calibration = stored
        knots = default_knots(gp.schedule.timesteps)
        gp.calibration = fit_calibration(knots, knot_errors(gp.predict_uncalibrated, gp.schedule, val_x, knots,
                                                            torch.Generator().manual_seed(1), draws=FINAL_DRAWS))
        for nfe in args.nfe:
            for name, recipe in recipes(nfe, args.adaptive_and_refine).items():
                for epistemic, den in (("head", head), ("gp", gp)):
                    for seed in args.seeds:
                        chunks: list[list[float]] = []  # per chunk: blending's mean gain at each step

                        def keep(r, chunks=chunks) -> None:
                            blend = r.output(BlendOutput)
                            chunks.append(blend.gain if blend is not None else [])

                        samples = run_ours(recipe, den, args.n, seed, batch=500, on_chunk=keep)
                        gains = [g for c in chunks for g in c]
                        by_step = [sum(c[i] for c in chunks if i < len(c)) / sum(i < len(c) for c in chunks)
                                   for i in range(max(map(len, chunks), default=0))]
                        row = {"run": label, "nfe": nfe, "recipe": name, "epistemic": epistemic, "seed": seed,
                               "nfe_used": samples.nfe, "mean_gain": sum(gains) / len(gains) if gains else None,
                               "gain_by_step": by_step or None, **score(samples.images, samples.variance, references)}
                        rows.append(row)
                        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    spaces = list(references)
    cols = ["run", "nfe", "recipe", "epistemic", "seed", "mean_gain",
            *[f"{s}/fd" for s in spaces], *[f"{s}/auroc_far" for s in spaces],
            *[f"{s}/auroc_unsure" for s in spaces if f"{s}/auroc_unsure" in rows[0]],
            *[f"{s}/filter" for s in spaces], *[f"{s}/filter_clusters" for s in spaces]]
    write_results(RESULTS, args.stem, {"args": vars(args), "rows": rows, "calibration": calibration}, rows, cols)
    write_results(RESULTS, f"{args.stem}_calibration", calibration, calibration,
                  ["run", "epistemic", "t", "mse", "mean_var_epistemic", "z2_total", "z2_total_recalibrated"])


if __name__ == "__main__":
    main()
