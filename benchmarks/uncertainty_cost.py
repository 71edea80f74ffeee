"""What does uncertainty cost at sampling time? (issue 4: K=8 <= 1.3x the posterior mean alone)

    python benchmarks/uncertainty_cost.py --ckpt runs/bdiff/<id>/checkpoints/last.ckpt [--stepper unipc]

Same stepper, steps and batch, CPU, 2 threads, median over ``--rounds`` rounds that run every variant
once in turn (``benchmarks/timing.py``: drift in the machine's speed hits all alike):
  * mean only: the U-Net with the guide's posterior-mean weights, zero variances
    (what a deterministic sampler would run);
  * K=8 sampled: 8 weight samples per call in one vmapped call, plus variance propagation;
  * closed form: the head's exact predictive (K -> infinity), plus variance propagation;
  * K=8 chains: the Monte Carlo alternative (8 full chains with their own weights).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.func import functional_call

from bdiff.bayes.predictive import BayesianDenoiser
from bdiff.checkpoint import load_model
from bdiff.denoiser import Prediction
from bdiff.sampling import Sampler
from bdiff.sampling import DDIM, DPMSolverPP2M, UniPC
from bdiff.sampling.noise import NoiseSource
from common import RESULTS, write_json
from timing import interleaved_medians


class PosteriorMean:
    """The network at the posterior-mean weights, no uncertainty: the baseline."""

    def __init__(self, den: BayesianDenoiser) -> None:
        self.schedule, self.image_shape, self.net = den.schedule, den.image_shape, den.model.net
        self.weights = {n: loc for n, (loc, _) in den.model.posterior_loc_scale().items()}

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> Prediction:
        eps, log_var = functional_call(self.net, self.weights, (x, t), strict=False)
        zero = torch.zeros_like(eps)
        return Prediction(eps, zero, zero)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--stepper", default="dpmpp_2m", choices=["dpmpp_2m", "unipc", "ddim"])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/uncertainty_cost[_<stepper>].json")
    args = p.parse_args()
    suffix = "" if args.stepper == "dpmpp_2m" else f"_{args.stepper}"
    out = args.out or RESULTS / f"uncertainty_cost{suffix}.json"
    stepper = {"dpmpp_2m": DPMSolverPP2M, "unipc": UniPC, "ddim": DDIM}[args.stepper]()
    torch.set_num_threads(2)
    den = load_model(args.ckpt)
    x_T = NoiseSource(0, range(args.batch)).draw(den.image_shape)
    sampled = load_model(args.ckpt, num_samples=8)
    sampled.mode = "sampled"
    analytic = load_model(args.ckpt)
    analytic.mode = "analytic"
    chains = den.posterior_chains(8)
    runs = {
        "mean only": lambda: Sampler(PosteriorMean(den), stepper, args.steps).run(x_T, NoiseSource(0, [0])),
        "K=8 sampled + propagation": lambda: Sampler(sampled, stepper, args.steps).run(x_T, NoiseSource(0, [0])),
        "closed form + propagation": lambda: Sampler(analytic, stepper, args.steps).run(x_T, NoiseSource(0, [0])),
        "K=8 Monte Carlo chains": lambda: Sampler(chains, stepper, args.steps).run(x_T.repeat(8, 1, 1, 1), NoiseSource(0, [0])),
    }
    times = interleaved_medians(runs, args.rounds)
    base = times["mean only"]
    rows = [{"variant": k, "seconds": v, "ratio_vs_mean_only": v / base} for k, v in times.items()]
    print(f"{args.stepper}, {args.steps} steps, batch {args.batch}")
    print("| variant | wall time | vs mean only |\n|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['seconds'] * 1e3:.0f} ms | {r['ratio_vs_mean_only']:.2f}x |")
    write_json(out, {"stepper": args.stepper, "batch": args.batch, "steps": args.steps, "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
