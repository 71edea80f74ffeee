"""How well does the propagated uncertainty map match Monte Carlo over weight samples, on the trained model?

    python benchmarks/variance_propagation.py --ckpt runs/bdiff/<id>/checkpoints/last.ckpt

Truth: K chains from the same noise, each with its own weight sample drawn from
the guide (``BayesianDenoiser.posterior_chains``), per-pixel variance over
chains. Compared with one run of the propagated map (Tweedie Jacobian term, and
without it). Reports the ratio of mean variances and correlations of the std maps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bdiff.checkpoint import load_model
from bdiff.sampling import DDIM, DPMSolverPP2M, Sampler
from bdiff.sampling.noise import NoiseSource
from common import RESULTS, write_json


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--n", type=int, default=64, help="images")
    p.add_argument("--chains", type=int, default=64, help="Monte Carlo weight samples")
    p.add_argument("--out", type=Path, default=RESULTS / "variance_propagation.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    den = load_model(args.ckpt)
    rows = []
    for stepper in (DDIM(), DPMSolverPP2M()):
        for steps in (10, 50):
            noise = NoiseSource(0, range(args.n))
            x_T = noise.draw(tuple(den.image_shape))
            chains = den.posterior_chains(args.chains, torch.Generator().manual_seed(1))
            mc = Sampler(chains, stepper, steps).run(x_T.repeat(args.chains, 1, 1, 1), NoiseSource(0, range(args.n * args.chains)))
            truth = mc.x.unflatten(0, (args.chains, -1)).var(0)
            for mode in ("tweedie", "independent_eps"):
                var = Sampler(den, stepper, steps, propagation=mode).run(x_T.clone(), noise).var
                rows.append({
                    "stepper": stepper.name, "steps": steps, "propagation": mode,
                    "mean_var_ratio": float(var.mean() / truth.mean()),
                    "corr_std_pixels": corr(var.sqrt(), truth.sqrt()),
                    "corr_per_sample": corr(var.flatten(1).mean(1), truth.flatten(1).mean(1)),
                })
                print(rows[-1], flush=True)
    write_json(args.out, rows)


if __name__ == "__main__":
    main()
