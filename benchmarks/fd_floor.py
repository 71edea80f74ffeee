"""What an FD against the training split can tell: a sampler that copies its data, and unseen real digits.

    python benchmarks/fd_floor.py --run A=runs/cos0/bdiff/t5pxamkz/checkpoints/last.ckpt \
        B=runs/cos1/bdiff/ywga63ep/checkpoints/last.ckpt --seeds 0 2

The sampler claims (issue 14) score 2,000 samples against the features of the real *training*
split. Two references put those FDs in scale, in every feature space of the evaluator:

1. **The memorizer**: 2,000 training digits drawn with replacement (mean over 5 draws), what a
   sampler that copies its training data would read. A number at or below it is no evidence of
   quality: it is what copying reads.
2. **Unseen real digits at the same sample size**: the 180 held-out digits (the validation split
   the model never trained on) against the training split, beside each sample set's FD on random
   180-subsets of its 2,000 (mean over 50). FD's bias depends on the sample size, so only equal
   sizes compare; at 180 the bias is large, so this tells where the samples are still far from
   real data (the sample set reads well above the unseen digits) rather than resolving small gaps.

Sample sets, on each run and sampling seed: at each budget the ``--nfe`` recipe
(:func:`bdiff.sampling.budget.recipe_for_budget`) and the best diffusers peer per feature space
(the peer configuration with the lowest FD in ``benchmarks/results/sampler_claims_cosine.json`` on
that run, seed and budget; rerun here from the same noise). Writes
``benchmarks/results/fd_floor.{json,md}``.
"""

from __future__ import annotations

import argparse
import json

import torch

from bdiff.checkpoint import load_model
from bdiff.datasets import digits_split
from bdiff.metrics.frechet import extract_features, frechet_distance_from_features
from bdiff.sampling.budget import recipe_for_budget
from bdiff.sampling.noise import NoiseSource
from common import RESULTS, references_for, write_results
from peers import Peer, run_ours, run_peer

CLAIMS = RESULTS / "sampler_claims_cosine.json"
MEMORIZER_DRAWS = 5
SUBSETS = 50


def fd_at(f_real: torch.Tensor, f_fake: torch.Tensor, n: int, draws: int, gen: torch.Generator) -> float:
    """Mean FD of ``draws`` random n-subsets (without replacement) of f_fake (N,D) against f_real (M,D)."""
    return sum(frechet_distance_from_features(f_real, f_fake[torch.randperm(len(f_fake), generator=gen)[:n]])
               for _ in range(draws)) / draws


def best_peers(rows: list[dict], run: str, seed: int, nfe: int, spaces: list[str]) -> dict[str, str]:
    """{space: the peer configuration ("diffusers-unipc, leading") with the lowest FD there} for one cell."""
    peers = [r for r in rows if r["family"] == "peer" and (r["run"], r["seed"], r["budget"]) == (run, seed, nfe)]
    if not peers:
        raise SystemExit(f"{CLAIMS} has no peer rows for run {run}, seed {seed}, {nfe} NFE: run sampler_claims.py report first")
    return {space: min(peers, key=lambda r: r[f"{space}/fd"])["sampler"] for space in spaces}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", nargs="+", required=True, help="label=checkpoint, labels as in sampler_claims_cosine.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 2])
    p.add_argument("--budgets", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    references = references_for()
    spaces = list(references)
    claims = json.loads(CLAIMS.read_text())["rows"]
    gen = torch.Generator().manual_seed(0)
    unseen = digits_split("val")
    baseline = {}
    for space, (extractor, f_real) in references.items():
        memorizer = [frechet_distance_from_features(f_real, f_real[torch.randint(len(f_real), (args.n,), generator=gen)])
                     for _ in range(MEMORIZER_DRAWS)]
        baseline[space] = {"memorizer": sum(memorizer) / len(memorizer),
                           "unseen_small": frechet_distance_from_features(f_real, extract_features(unseen, extractor))}
    small = len(unseen)
    rows = []
    for item in args.run:
        label, _, path = item.partition("=")
        denoiser = load_model(path)
        for seed in args.seeds:
            x_T = NoiseSource(seed, range(args.n)).draw(tuple(denoiser.image_shape))
            for nfe in args.budgets:
                sets = {"--nfe entry": run_ours(recipe_for_budget(nfe), denoiser, args.n, seed, 1000).images}
                peers = best_peers(claims, label, seed, nfe, spaces)
                for config in dict.fromkeys(peers.values()):
                    sets[config] = run_peer(Peer.from_label(config), nfe, denoiser, x_T, 1000).images
                for space, (extractor, f_real) in references.items():
                    row = {"run": label, "seed": seed, "budget": nfe, "space": space, "best peer": peers[space],
                           "memorizer": baseline[space]["memorizer"], f"unseen digits (n={small})": baseline[space]["unseen_small"]}
                    for key, images in (("peer", sets[peers[space]]), ("entry", sets["--nfe entry"])):
                        f_fake = extract_features(images, extractor)
                        row[key] = frechet_distance_from_features(f_real, f_fake)
                        row[f"{key} (n={small})"] = fd_at(f_real, f_fake, small, SUBSETS, gen)
                    rows.append(row)
                    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    columns = ["run", "seed", "budget", "space", "best peer", "memorizer", "peer", "entry",
               f"unseen digits (n={small})", f"peer (n={small})", f"entry (n={small})"]
    write_results(RESULTS, "fd_floor", {"runs": args.run, "seeds": args.seeds, "n": args.n, "rows": rows}, rows, columns)


if __name__ == "__main__":
    main()
