"""Held-out class: does the posterior know what it has not seen?

    python benchmarks/heldout_class.py --classes 3 5 8 --steps 3000 --ensemble 3 [--threads 1]

For each held-out digit class c, trains the default config without c
(``--data.init_args.exclude_classes [c]``, ``--trainer.max_steps`` = ``--steps``; fewer than the
default run's 4,800 to fit the CPU budget) and scores every posterior design on:

* ``heldout``: every image of class c (never trained on) and ``seen``: the *validation* images
  of the other classes (not training images), each noised once per t with fixed seeds;
* per t in {10, 50, 100, 250, 500, 750}: mean per-image epistemic variance on each, their
  ratio, the AUROC of per-image epistemic variance for telling class c apart
  (torchmetrics), and the ratio of the per-image eps MSE (how much worse the model really is);
* against a **deep ensemble** (``--ensemble`` deterministic plain DDPMs, ``configs/digits_ddpm.yaml``
  with the same class held out and seeds 0..M-1): Spearman correlation of the design's
  per-image epistemic variance with the ensemble's disagreement (per-pixel variance of eps
  over members, averaged per image) on the seen-class validation images, and the ensemble's
  own ratio/AUROC (what epistemic *should* look like).

Designs, all on the same trained trunk (the shipped ones from ``bdiff.bayes``, the others from
``benchmarks/heldout_baselines/``): ``meanfield_head`` (the trained
mean-field head, today's default); ``laplace_head`` (closed-form full-covariance posterior of
the head, :mod:`heldout_baselines.laplace`; its prior precision is chosen by held-out
log-likelihood on the seen-class validation images from a grid, never by the held-out class);
``meanfield_last_block`` (with ``--block-classes``: its own run with the last decoder ResBlock's
convs and the head mean-field Bayesian, K = 8 sampled weights); ``meanfield_mid_block`` (with
``--mid-classes``: its own run with the bottleneck ResBlocks' convs and the head mean-field, K = 8); ``rpf_head_ensemble_8`` (8 two-layer heads with randomized prior functions and bootstrap,
:mod:`heldout_baselines.head_ensemble`, beta = 1, trained ``--head-ensemble-steps`` steps);
``bottleneck_gp`` (a random-feature GP on the bottleneck activations, its posterior variance
as the epistemic variance, :mod:`bdiff.bayes.bottleneck_gp`; defaults chosen on class 3);
``decoder_ensemble_M`` (``--decoder-members`` freshly initialised decoders -- up path with its
skips, final norm, head -- on the trained model's frozen encoder, bootstrap L_simple for
``--decoder-ensemble-steps`` steps, :mod:`heldout_baselines.decoder_ensemble`).

Cost: per design, the median time of one ``predict`` on a batch of 256 over that of one
deterministic forward of the trained network (timed interleaved, 15 rounds, so machine load
hits both alike).

Training runs are cached under ``--runs`` (a finished run is reused). Writes
``benchmarks/results/heldout_class.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torchmetrics.functional.classification import binary_auroc

from bdiff.bayes.bottleneck_gp import BottleneckGP
from bdiff.checkpoint import load_model
from bdiff.denoiser import Prediction
from bdiff.lit.data import DigitsDataModule
from bdiff.metrics.usefulness import spearman
from common import RESULTS, ROOT, write_results
from heldout_baselines.decoder_ensemble import DecoderEnsemble
from heldout_baselines.head_ensemble import HeadEnsemble
from heldout_baselines.laplace import HeadLaplace, default_prior_precision, head_fisher
from timing import interleaved_medians

TIMESTEPS = (10, 50, 100, 250, 500, 750)
SUMMARY_T = (50, 100, 250, 500)  # the targets' range t in [50, 500]
PRIOR_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)  # x the head's fan_in


LAST_BLOCK = "[up.4.0.conv1.*,up.4.0.conv2.*,up.4.0.skip.*,head.*]"  # last decoder ResBlock's convs + head
MID_BLOCK = "[mid.0.conv1.*,mid.0.conv2.*,mid.2.conv1.*,mid.2.conv2.*,head.*]"  # bottleneck ResBlocks' convs + head


def train(config: str, exclude: int, seed: int, steps: int, runs: Path, threads: int,
          extra: tuple[str, ...] = (), tag: str = "") -> Path:
    """Train (or reuse) one run of ``config`` (plus ``extra`` overrides) without class ``exclude``; returns its last.ckpt."""
    run_dir = runs / f"{Path(config).stem}{tag}_without{exclude}_seed{seed}_{steps}steps"
    found = sorted(run_dir.glob("**/checkpoints/last.ckpt"))
    if found and (run_dir / "done").is_file():
        return found[-1]
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / config),
           f"--seed_everything={seed}", f"--data.init_args.exclude_classes=[{exclude}]",
           f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={run_dir}",
           f"--trainer.logger.init_args.save_dir={run_dir}", "--trainer.enable_progress_bar=false", *extra]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(threads)}
    t0 = time.time()
    print("training:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    print(f"  {time.time() - t0:.0f} s", flush=True)
    (run_dir / "done").write_text(f"{time.time() - t0:.1f} s\n")
    return sorted(run_dir.glob("**/checkpoints/last.ckpt"))[-1]


def split_images(exclude: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(training images, seen-class validation images, held-out class images), each (N,1,8,8) in [-1,1]."""
    dm = DigitsDataModule(exclude_classes=[exclude])
    dm.setup("fit")
    stack = lambda ds: torch.stack([ds[i] for i in range(len(ds))])  # noqa: E731
    return stack(dm.train_dataset), stack(dm.val_dataset), stack(dm.heldout_dataset)


@torch.no_grad()
def per_image(predict, schedule, x0: torch.Tensor, t: int, seed: int) -> dict[str, torch.Tensor]:
    """Per-image (N,) epistemic variance, eps MSE and Gaussian log-likelihood at one t (fixed noise)."""
    g = torch.Generator().manual_seed(seed * 1000 + t)
    noise = torch.randn(x0.shape, generator=g)
    tt = torch.full((x0.shape[0],), t, dtype=torch.long)
    pred: Prediction = predict(schedule.q_sample(x0, tt, noise), tt)
    err2 = (noise - pred.eps) ** 2
    var = pred.var_total.clamp_min(1e-12)
    ll = -0.5 * (math.log(2 * math.pi) + var.log() + err2 / var)
    return {"epistemic": pred.var_epistemic.flatten(1).mean(1), "mse": err2.flatten(1).mean(1),
            "ll": ll.flatten(1).mean(1), "eps": pred.eps}


def choose_laplace(denoiser, train_x: torch.Tensor, val_x: torch.Tensor) -> tuple[HeadLaplace, float, list]:
    """Laplace head with the prior precision of best seen-class validation log-likelihood (over all t)."""
    fisher, n = head_fisher(denoiser.model, denoiser.schedule, train_x.split(256), draws=4)
    base = default_prior_precision(denoiser.model)
    scores = []
    for mult in PRIOR_GRID:
        lap = HeadLaplace(denoiser.model, denoiser.schedule, fisher, n, base * mult)
        ll = sum(float(per_image(lap.predict, denoiser.schedule, val_x, t, seed=7)["ll"].mean()) for t in TIMESTEPS)
        scores.append((mult, ll / len(TIMESTEPS)))
    best = max(scores, key=lambda s: s[1])[0]
    return HeadLaplace(denoiser.model, denoiser.schedule, fisher, n, base * best), best, scores


def score(name: str, predict, schedule, seen: torch.Tensor, held: torch.Tensor,
          disagreement: dict[int, torch.Tensor] | None) -> list[dict[str, Any]]:
    rows = []
    for t in TIMESTEPS:
        s, h = per_image(predict, schedule, seen, t, seed=1), per_image(predict, schedule, held, t, seed=2)
        labels = torch.cat([torch.zeros(len(seen)), torch.ones(len(held))]).long()
        row = {"design": name, "t": t,
               "epistemic_seen": float(s["epistemic"].mean()), "epistemic_heldout": float(h["epistemic"].mean()),
               "error_ratio": float(h["mse"].mean() / s["mse"].mean())}
        row["ratio"] = row["epistemic_heldout"] / max(row["epistemic_seen"], 1e-30)
        row["auroc"] = float(binary_auroc(torch.cat([s["epistemic"], h["epistemic"]]), labels))
        if disagreement is not None:
            row["spearman_vs_ensemble"] = spearman(s["epistemic"], disagreement[t])
        rows.append(row)
    return rows


@torch.no_grad()
def cost_ratios(designs: dict[str, Any], net: torch.nn.Module, rounds: int = 15) -> dict[str, float]:
    """Median seconds of each design's predict on 256 images over one deterministic forward of ``net``."""
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(256, net.config.in_channels, net.config.image_size, net.config.image_size, generator=g), torch.randint(0, 1000, (256,), generator=g)
    fns = {"deterministic_forward": lambda: net(x_t, t), **{k: (lambda f=f: f(x_t, t)) for k, f in designs.items()}}
    med = interleaved_medians(fns, rounds)
    return {k: med[k] / med["deterministic_forward"] for k in designs}


@torch.no_grad()
def draw_epistemic_maps(path: Path, designs: dict[str, Any], schedule, seen: torch.Tensor, held: torch.Tensor,
                        exclude: int, t: int = 100, n: int = 6) -> None:
    """Seen-class and held-out images with each design's per-pixel epistemic std at ``t``, one colour scale per design."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x0 = torch.cat([seen[:n], held[:n]])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
    tt = torch.full((len(x0),), t, dtype=torch.long)
    x_t = schedule.q_sample(x0, tt, noise)
    fig, axes = plt.subplots(1 + len(designs), 2 * n, figsize=(1.1 * 2 * n, 1.25 * (1 + len(designs))), squeeze=False)
    for j in range(2 * n):
        axes[0, j].imshow(x0[j, 0], cmap="gray", vmin=-1, vmax=1)
        axes[0, j].set_title("seen" if j < n else f"unseen {exclude}", fontsize=7)
    for i, (name, predict) in enumerate(designs.items(), start=1):
        std = predict(x_t, tt).var_epistemic.clamp_min(0).sqrt()[:, 0]
        top = float(torch.quantile(std.flatten(), 0.99))
        for j in range(2 * n):
            axes[i, j].imshow(std[j], cmap="magma", vmin=0, vmax=top)
        axes[i, 0].set_ylabel(name.replace("_", " "), fontsize=6, rotation=0, ha="right", va="center")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"epistemic std of eps at t = {t} (trained without digit {exclude}; one colour scale per row)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Ensemble:
    """Deep ensemble of deterministic denoisers as one Denoiser: eps mean, epistemic = variance over members."""

    def __init__(self, members: list) -> None:
        self.members, self.schedule = members, members[0].schedule

    def predict(self, x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        preds = [m.predict_uncalibrated(x_t, t) for m in self.members]
        eps = torch.stack([p.eps for p in preds])
        return Prediction(eps.mean(0), eps.var(0, unbiased=True),
                          torch.stack([p.var_aleatoric for p in preds]).mean(0))


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over t in [50, 500] per (class, design)."""
    out = []
    keys = dict.fromkeys((r["heldout_class"], r["design"]) for r in rows)
    for c, d in keys:
        mine = [r for r in rows if r["heldout_class"] == c and r["design"] == d and r["t"] in SUMMARY_T]
        entry: dict[str, Any] = {"heldout_class": c, "design": d}
        for k in ("ratio", "auroc", "error_ratio", "spearman_vs_ensemble", "cost_vs_forward"):
            vals = sorted(r[k] for r in mine if r.get(k) is not None)
            if vals:
                entry[f"median_{k}"] = vals[len(vals) // 2] if len(vals) % 2 else 0.5 * (vals[len(vals) // 2 - 1] + vals[len(vals) // 2])
        out.append(entry)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, nargs="+", default=[3, 5, 8])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--ensemble", type=int, default=3, help="deep-ensemble members (deterministic DDPMs)")
    p.add_argument("--ensemble-classes", type=int, nargs="*", default=None,
                   help="held-out classes that get the ensemble reference (default: the first)")
    p.add_argument("--head-ensemble-steps", type=int, default=1000,
                   help="training steps of the randomized-prior head ensemble (0: skip that design)")
    p.add_argument("--decoder-ensemble-steps", type=int, default=0,
                   help="training steps of the decoder-branch ensemble (0: skip that design)")
    p.add_argument("--decoder-members", type=int, default=4, help="members of the decoder-branch ensemble")
    p.add_argument("--block-classes", type=int, nargs="*", default=[],
                   help="held-out classes that also get design (b): the last decoder block + head mean-field (own run)")
    p.add_argument("--mid-classes", type=int, nargs="*", default=[],
                   help="held-out classes that also get the bottleneck's ResBlock convs + head mean-field (own run)")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "heldout")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stem", default="heldout_class")
    p.add_argument("--figure", action="store_true",
                   help="also draw benchmarks/results/<stem>.png: seen and unseen digits with each design's epistemic map")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ens_classes = args.classes[:1] if args.ensemble_classes is None else args.ensemble_classes
    rows, chosen = [], {}
    for c in args.classes:
        ckpt = train("configs/digits.yaml", c, 0, args.steps, args.runs, args.threads)
        members = ([train("configs/digits_ddpm.yaml", c, s, args.steps, args.runs, args.threads)
                    for s in range(args.ensemble)] if c in ens_classes and args.ensemble > 1 else [])
        train_x, seen, held = split_images(c)
        den = load_model(ckpt)
        designs: dict[str, Any] = {"meanfield_head": den.predict_uncalibrated}
        laplace, mult, scores = choose_laplace(den, train_x, seen)
        designs["laplace_head"] = laplace.predict
        with_gp = load_model(ckpt)
        with_gp.epistemic_gp = BottleneckGP.fit(with_gp.model, with_gp.schedule, train_x.split(256))
        designs["bottleneck_gp"] = with_gp.predict_uncalibrated
        if args.head_ensemble_steps:
            rpf = HeadEnsemble(den.model, den.schedule, members=8, hidden=16, prior_scale=1.0)
            order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
            rpf.fit(train_x[order].split(128), args.head_ensemble_steps)
            designs["rpf_head_ensemble_8"] = rpf.predict
        if args.decoder_ensemble_steps:
            t0 = time.time()
            dec = DecoderEnsemble(den.model, den.schedule, members=args.decoder_members)
            order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
            dec.fit(train_x[order].split(128), args.decoder_ensemble_steps)
            print(f"  decoder ensemble trained in {time.time() - t0:.0f} s", flush=True)
            designs[f"decoder_ensemble_{args.decoder_members}"] = dec.predict
        chosen[c] = {"laplace_prior_precision_x_fan_in": mult, "val_ll_per_pixel": scores}
        if c in args.block_classes:  # design (b): the last decoder block + head mean-field Bayesian, its own run
            block = load_model(train("configs/digits.yaml", c, 0, args.steps, args.runs, args.threads,
                                     (f"--model.bayes.layers={LAST_BLOCK}",), tag="_lastblock"))
            designs["meanfield_last_block"] = block.predict_uncalibrated
        if c in args.mid_classes:  # the signal lives in the trunk: a posterior on the bottleneck (own run)
            mid = load_model(train("configs/digits.yaml", c, 0, args.steps, args.runs, args.threads,
                                   (f"--model.bayes.layers={MID_BLOCK}",), tag="_midblock"))
            designs["meanfield_mid_block"] = mid.predict_uncalibrated
        disagreement = None
        if members:
            ens = Ensemble([load_model(m) for m in members])
            designs[f"deep_ensemble_{len(members)}"] = ens.predict
            disagreement = {t: per_image(ens.predict, den.schedule, seen, t, seed=1)["epistemic"] for t in TIMESTEPS}
        if args.figure and c == args.classes[0]:
            draw_epistemic_maps(RESULTS / f"{args.stem}.png", designs, den.schedule, seen, held, c)
        costs = cost_ratios(designs, den.model.net)
        for name, predict in designs.items():
            for r in score(name, predict, den.schedule, seen, held, disagreement):
                rows.append({"heldout_class": c, **r, "cost_vs_forward": costs.get(name)})
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    summary = summarise(rows)
    cols = ["heldout_class", "design", "median_ratio", "median_auroc", "median_error_ratio", "median_spearman_vs_ensemble",
            "median_cost_vs_forward"]
    write_results(RESULTS, args.stem,
                  {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "rows": rows,
                   "laplace_selection": chosen}, summary, cols)


if __name__ == "__main__":
    main()
