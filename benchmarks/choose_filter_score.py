"""How large should the look-alike groups of the per-sample score be? The choice behind ``SAMPLES_PER_CLUSTER``.

    python benchmarks/choose_filter_score.py --ckpt <run A's last.ckpt> --seed 1

On one checkpoint and sampling seed (the choice cell; the shipped setting is then reported on
other runs and seeds by ``benchmarks/where_uncertainty_pays.py``): 1,000 samples of the ``--nfe``
recipe at 5, 10 and 20 calls; drop the 20% least certain by the raw mean variance, and by its rank
within k-means clusters of k = 5, 10, 20, 50 and 100 look-alikes
(:func:`bdiff.metrics.usefulness.uncertainty_within_clusters`), against a random 20% (mean of 5).
Per space: FD ratio, precision difference and classifier-error ratio. Fewer clusters find more of
the samples a classifier is unsure of; more clusters keep the batch's mix (FD).

Writes ``benchmarks/results/choose_filter_score.json`` and ``.md``.
"""

from __future__ import annotations

import argparse

from bdiff.checkpoint import load_model
from bdiff.metrics.report import filtering_in_spaces
from bdiff.metrics.usefulness import per_sample_uncertainty, uncertainty_within_clusters
from bdiff.sampling.budget import recipe_for_budget
from common import RESULTS, references_for, write_results
from peers import run_ours
CLUSTERS = (5, 10, 20, 50, 100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--stem", default="choose_filter_score")
    args = p.parse_args()
    denoiser, references = load_model(args.ckpt), references_for()
    rows = []
    for nfe in (5, 10, 20):
        s = run_ours(recipe_for_budget(nfe), denoiser, args.n, args.seed, 500)
        scores = {"raw": per_sample_uncertainty(s.variance)}
        scores.update({f"{k} clusters": uncertainty_within_clusters(s.images, s.variance, clusters=k) for k in CLUSTERS})
        for name, score in scores.items():
            row = {"nfe": nfe, "score": name}
            for space, r in filtering_in_spaces(s.images, score, references).items():
                row[f"{space} fd"] = r["fd_certain"] / r["fd_random"]
                row[f"{space} Δprec"] = r["precision_certain"] - r["precision_random"]
                if "error_certain" in r:
                    row[f"{space} err"] = r["error_certain"] / r["error_random"]
            rows.append(row)
            print(row, flush=True)
    write_results(RESULTS, args.stem, {"ckpt": args.ckpt, "seed": args.seed, "rows": rows},
                  rows, list(rows[0]))


if __name__ == "__main__":
    main()
