"""How high is the bar? Every diffusers solver, grid and option against what ``--nfe`` runs (issue 14).

    # the screen, on the choose cell (run A, sampling seed 1): ~40 min on 2 CPU cores
    python benchmarks/peer_bar.py --run A=runs/cos0/bdiff/<id>/checkpoints/last.ckpt:1 --stem peer_bar_choose
    # a first pass with every configuration on 500 samples each (~20 min): ranks that do not hold on 2,000
    python benchmarks/peer_bar.py --run A=runs/cos0/bdiff/<id>/checkpoints/last.ckpt:1 --configs all --n 500 \
        --clip-leaders 0 --clip-all-up-to 0 --stem peer_bar_all_n500

The sampler claims' bar (``benchmarks/sampler_claims.py``) was the best of 11 diffusers
configurations: DDIM, DPM-Solver++(2M) and UniPC (order 2, bh2) on the leading, linspace, trailing
and Karras grids. diffusers offers more, and an independent check may use any of it
(:func:`peers.all_peers`, 190 configurations: DPM-Solver++ multistep and single-step, UniPC with B(h)
bh1 and bh2, DEIS, each at order 2 and 3; the exponential, beta and log-SNR-uniform grids beside the
four above; with and without clipping the x0 prediction to the data range; the last step to sigma 0
or to the smallest sigma). All of them at 2,000 samples would cost about 1.5 h per cell on 2 CPU
cores. The screen runs :func:`peers.screened_peers` (76: no beta grid, no DDIM, no clipping; why in
its docstring) at 2,000 samples, then the x0-clipped twin of every one at 5 NFE and of the 3 leaders
per space above, on the same network from the same per-sample noise. It reports, per budget, cell
and feature space: the best of the first 11's configurations that ran (the old bar; DDIM only with
``--configs all``), the best of all that ran (the new bar), and what the ``--nfe`` recipe
(:func:`bdiff.sampling.budget.recipe_for_budget`) reads against each. ``sampler_claims.py`` takes the
screen's best per budget and space into its bar (:func:`sampler_claims.extra_peers`) and measures
them on the report cells. ``--bar-from`` runs the old bar and a screen's ``--top`` best elsewhere.
A configuration whose samples are not finite reads FD inf.
Writes ``benchmarks/results/<stem>.{json,md}`` and ``<stem>_summary.md``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import asdict, replace

import torch

from bdiff.checkpoint import load_model
from bdiff.sampling.budget import recipe_for_budget
from bdiff.sampling.noise import NoiseSource
from common import RESULTS, references_for, write_json, write_results
from peers import Peer, all_peers, bar_from, diverged, in_old_bar, parse_run, run_ours, run_peer, screened_peers
from sampler_claims import score_row
ENTRY = "--nfe entry"


def cell_rows(label: str, denoiser, seed: int, nfe: int, n: int, references: dict, peers: list[Peer],
              clip_leaders: int = 0, clip_all_up_to: int = 0) -> list[dict]:
    """The ``--nfe`` entry and every peer on one (run, sampling seed, budget) cell, then the x0-clipped twin of
    every peer (at ``nfe`` <= ``clip_all_up_to``) or of the ``clip_leaders`` best peers per feature space."""
    x_T = NoiseSource(seed, range(n)).draw(tuple(denoiser.image_shape))
    base = {"run": label, "seed": seed, "budget": nfe}
    entry = run_ours(recipe_for_budget(nfe), denoiser, n, seed, 1000)
    rows = [{**base, "sampler": ENTRY, "family": "entry", "old_bar": False, **score_row(entry.images, references, {})}]
    print_row(rows[-1], references)

    def run(peer: Peer) -> None:
        samples = run_peer(peer, nfe, denoiser, x_T, 1000)
        blown_up = diverged(samples)
        scores = {f"{s}/fd": float("inf") for s in references} if blown_up else score_row(samples.images, references, {})
        rows.append({**base, "sampler": peer.label, "family": "peer", "peer": asdict(peer), "old_bar": in_old_bar(peer),
                     "diverged": blown_up, **scores})
        print_row(rows[-1], references)

    for peer in peers:
        run(peer)
    if nfe <= clip_all_up_to:  # x0 clipping on every configuration: it rescues order 3 on steep grids at few steps
        for peer in [p for p in peers if not p.clip]:
            run(replace(peer, clip=True))
    elif clip_leaders:  # x0 clipping on the best few of each space
        ran = {r["sampler"] for r in rows}
        for space in references:
            ranked = sorted((r for r in rows if r["family"] == "peer"), key=lambda r: r[f"{space}/fd"])
            for r in ranked[:clip_leaders]:
                twin = replace(Peer(**r["peer"]), clip=True)
                if twin.label not in ran:
                    run(twin)
                    ran.add(twin.label)
    return rows


def print_row(row: dict, references: dict) -> None:
    print(f"{row['run']} seed {row['seed']} NFE {row['budget']:2d} {row['sampler']:36s} "
          + "  ".join(f"{s} {row[f'{s}/fd']:.4g}" for s in references), flush=True)


def summary(rows: list[dict], spaces: list[str]) -> str:
    """Markdown: per budget and cell, the best old-bar and new-bar peer per space and the entry's ratio to each."""
    lines = ["| budget | cell | space | old bar: best of the first 11 | new bar: best of all | entry FD | entry / old bar | "
             "entry / new bar |",
             "|---|---|---|---|---|---|---|---|"]
    for nfe in sorted({r["budget"] for r in rows}):
        for cell in sorted({(r["run"], r["seed"]) for r in rows if r["budget"] == nfe}):
            at = [r for r in rows if r["budget"] == nfe and (r["run"], r["seed"]) == cell]
            entry = next(r for r in at if r["family"] == "entry")
            for space in spaces:
                key = f"{space}/fd"
                old = min((r for r in at if r["old_bar"]), key=lambda r: r[key])
                new = min((r for r in at if r["family"] == "peer"), key=lambda r: r[key])
                lines.append(f"| {nfe} | {cell[0]} seed {cell[1]} | {space} | {old[key]:.4g} ({old['sampler']}) | "
                             f"{new[key]:.4g} ({new['sampler']}) | {entry[key]:.4g} | {entry[key] / old[key]:.2f} | "
                             f"{entry[key] / new[key]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", nargs="+", default=[], help="label=checkpoint:seed[,seed...], one per training run")
    p.add_argument("--budgets", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stem", default="peer_bar")
    p.add_argument("--summarise", action="store_true", help="rewrite <stem>_summary.md from <stem>.json (no sampling)")
    p.add_argument("--configs", choices=["screen", "all"], default="screen",
                   help="screen: peers.screened_peers (76, then --clip-leaders); all: every one of peers.all_peers (190)")
    p.add_argument("--clip-leaders", type=int, default=3, help="screen: clipped twins of this many leaders per space")
    p.add_argument("--clip-all-up-to", type=int, default=5,
                   help="screen: at budgets up to this, the clipped twin of every configuration (on 500 samples, clipping "
                        "took DPM-Solver++(3M) on the log-SNR grid from 30 to the best FD at 5 NFE)")
    p.add_argument("--bar-from", default=None,
                   help="stem of a run with every configuration (the choose cell): run only the old bar and its --top best")
    p.add_argument("--top", type=int, default=5, help="with --bar-from: configurations kept per budget and feature space")
    p.add_argument("--resume", action="store_true", help="keep <stem>.json's cells and run only the missing ones")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*lower_order_final.*")
    if not args.run and not args.summarise:
        p.error("--run is needed (unless --summarise)")
    out = RESULTS / f"{args.stem}.json"
    rows = json.loads(out.read_text())["rows"] if args.summarise or args.resume else []
    if not args.summarise:
        references = references_for()
        if args.bar_from is None:
            peers = {nfe: all_peers() if args.configs == "all" else screened_peers() for nfe in args.budgets}
        else:
            peers = bar_from(json.loads((RESULTS / f"{args.bar_from}.json").read_text())["rows"], args.top)
        print({nfe: len(v) for nfe, v in peers.items()}, "peer configurations per budget", flush=True)
        for item in args.run:
            label, ckpt, seeds = parse_run(item)
            denoiser = load_model(ckpt)
            for seed in seeds:
                for nfe in args.budgets:
                    if any((r["run"], r["seed"], r["budget"]) == (label, seed, nfe) for r in rows):
                        continue  # --resume: this cell is done
                    rows += cell_rows(label, denoiser, seed, nfe, args.n, references, peers[nfe],
                                      args.clip_leaders if args.bar_from is None else 0,
                                      args.clip_all_up_to if args.bar_from is None else 0)
                    write_json(out, {"runs": args.run, "n": args.n, "rows": rows})  # after each cell
    spaces = sorted({k.split("/")[0] for k in rows[0] if k.endswith("/fd")})
    columns = ["run", "seed", "budget", "sampler", "old_bar", *[f"{s}/{k}" for s in spaces for k in ("fd", "kid", "precision", "recall")]]
    payload = json.loads(out.read_text()) if args.summarise else {"runs": args.run, "n": args.n}
    write_results(RESULTS, args.stem, {**payload, "rows": rows}, rows, columns)
    text = summary(rows, spaces)
    (RESULTS / f"{args.stem}_summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
