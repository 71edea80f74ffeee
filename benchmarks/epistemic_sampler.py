"""Does the sampler use the new epistemic variance? Blending and ranking with and without the bottleneck GP.

    python benchmarks/epistemic_sampler.py --runs A=runs/bdiff/hlppwji9 B=runs/bdiff/zwj3ik1j --seeds 0 2 --n 1000

For each training run the bottleneck GP (:mod:`bdiff.bayes.bottleneck_gp`) is fitted post hoc on
the training digits with the final EMA weights (what ``model.epistemic_gp: true`` does at every
validation). Per budget (5, 10, 20 NFE): the ``--nfe`` recipe (:mod:`bdiff.sampling.budget`) and
the same recipe plus variance-weighted blending, each with the head's epistemic variance alone
(``head``) and with the GP's added (``gp``). Per feature space (``bdiff.evaluate.references_for``):
FD, precision, recall; blending's mean Kalman gain; and the ranking only epistemic can serve:
AUROC of each sample's propagated uncertainty (mean of its variance map) for the 20% of samples
farthest from any real digit (nearest-real distance in that space), and, in classifier spaces,
for the 20% the classifier is least confident on. Nothing here is tuned (blend strength 1, the
GP's settings from the held-out-class benchmark), so every run and seed is a report.

Writes ``benchmarks/results/epistemic_sampler.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from bdiff.bayes.bottleneck_gp import BottleneckGP
from bdiff.checkpoint import load_model
from bdiff.evaluate import digits_split, references_for
from bdiff.metrics.frechet import extract_features
from bdiff.metrics.report import quality_from_features
from bdiff.metrics.usefulness import auroc_worst, nearest_real_distance, per_sample_uncertainty
from bdiff.sampling.budget import recipe_for_budget
from bdiff.sampling.recipe import Recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import run_ours, write_results  # noqa: E402  (benchmarks/ is the script's folder)

ROOT = Path(__file__).resolve().parents[1]


def recipes(nfe: int) -> dict[str, Recipe]:
    """The budget's recipe and the same with blending."""
    base = recipe_for_budget(nfe)
    data = {k: v for k, v in base.as_dict().items() if k != "name"}
    blend = Recipe.from_dict({**data, "callbacks": [*data["callbacks"], {"name": "blend", "strength": 1.0}]},
                             name=f"{base.name}+blend")
    return {"recipe": base, "recipe+blend": blend}


def score(images: torch.Tensor, variance: torch.Tensor, references: dict) -> dict[str, float]:
    """Quality and ranking metrics of samples (N,C,H,W) in [0,1] with their variance maps, per space."""
    row: dict[str, float] = {}
    u = per_sample_uncertainty(variance)
    for space, (extractor, f_real) in references.items():
        f_fake = extract_features(images, extractor)
        q = quality_from_features(f_real, f_fake)
        row.update({f"{space}/{k}": q[k] for k in ("fd", "precision", "recall")})
        row[f"{space}/auroc_far"] = auroc_worst(u, nearest_real_distance(f_fake, f_real))
        if getattr(extractor, "is_classifier", False):
            conf = torch.cat([extractor.confidence(c) for c in images.split(1000)])
            row[f"{space}/auroc_unsure"] = auroc_worst(u, -conf)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="LABEL=run folder (with checkpoints/last.ckpt)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 2])
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stem", default="epistemic_sampler")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    references = references_for()
    train_x = digits_split("train") * 2 - 1
    rows: list[dict[str, Any]] = []
    for spec in args.runs:
        label, folder = spec.split("=", 1)
        ckpt = ROOT / folder / "checkpoints" / "last.ckpt"
        head = load_model(ckpt)
        head.epistemic_gp = None  # the head's posterior alone, even if the run was trained with the GP
        gp = load_model(ckpt)
        gp.epistemic_gp = BottleneckGP.fit(gp.model, gp.schedule, train_x[:2048].split(256))
        for nfe in args.nfe:
            for name, recipe in recipes(nfe).items():
                for epistemic, den in (("head", head), ("gp", gp)):
                    for seed in args.seeds:
                        gains: list[float] = []

                        def keep(r, gains=gains) -> None:
                            gains.extend(r.extras.get("blend", {}).get("gain", []))

                        samples = run_ours(recipe, den, args.n, seed, batch=500, on_chunk=keep)
                        row = {"run": label, "nfe": nfe, "recipe": name, "epistemic": epistemic, "seed": seed,
                               "nfe_used": samples.nfe, "mean_gain": sum(gains) / len(gains) if gains else None,
                               **score(samples.images, samples.variance, references)}
                        rows.append(row)
                        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    spaces = list(references)
    cols = ["run", "nfe", "recipe", "epistemic", "seed", "mean_gain",
            *[f"{s}/fd" for s in spaces], *[f"{s}/auroc_far" for s in spaces],
            *[f"{s}/auroc_unsure" for s in spaces if f"{s}/auroc_unsure" in rows[0]]]
    write_results(ROOT / "benchmarks" / "results", args.stem, {"args": vars(args), "rows": rows}, rows, cols)


if __name__ == "__main__":
    main()
