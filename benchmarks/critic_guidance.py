"""Critic error correction: the same recipe with and without the critic, and diffusers' samplers, at equal NFE.

    python benchmarks/critic_guidance.py --ckpt runs/bdiff/<id>/checkpoints/last.ckpt \\
        --critic runs/critic/digits/checkpoints/last.ckpt [--n 2000] [--seeds 0 2]

For each budget (5 and 10 sequential denoiser calls per sample, extra passes included) it
runs diffusers' DDIM / DPM-Solver++(2M) / UniPC, our recipe without the critic, with the
critic's correction only, and with correction plus the consistency loop (the committed
recipes ``configs/sampler/dpmpp_critic.yaml`` and ``dpmpp_adaptive_critic.yaml``), from the
same per-sample noise. Reports FD/KID (digits features, real training split), mean and max
NFE, critic calls per sample, the share of samples flagged, retries, wall time, and the
median pixel distance of each sample to its nearest training image (a memorisation check:
a critic that pulled samples onto training images would shrink it). As a filter, each
finished set is also scored by the critic at t=0: FD after dropping the 20% the critic likes
least over FD after dropping a random 20% (``critic_filter_ratio``; below 1 = it finds bad
images), beside the same ratio for the propagated posterior variance. Writes
``benchmarks/results/critic_guidance.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import run_diffusers, run_ours, write_results  # noqa: E402

from bdiff.checkpoint import load_model  # noqa: E402
from bdiff.evaluate import digits_split, reference_for  # noqa: E402
from bdiff.critic import load_critic  # noqa: E402
from bdiff.metrics.frechet import extract_features  # noqa: E402
from bdiff.metrics.report import evaluate_sample_set  # noqa: E402
from bdiff.metrics.usefulness import fd_after_filtering  # noqa: E402
from bdiff.metrics.samples_file import SampleSet  # noqa: E402
from bdiff.sampling.critic import flag_summary  # noqa: E402
from bdiff.sampling.noise import NoiseSource  # noqa: E402
from bdiff.sampling.recipe import Recipe  # noqa: E402
from bdiff.sampling.sampler import SampleResult  # noqa: E402

RECIPES = {5: ROOT / "configs/sampler/dpmpp_adaptive_critic.yaml", 10: ROOT / "configs/sampler/dpmpp_critic.yaml"}


def variants(path: Path, critic: str, nfe: int) -> dict[str, Recipe]:
    """The committed critic recipe, the same with the loop off, and without the critic at ``nfe`` calls."""
    full = Recipe.from_yaml(path).as_dict()
    for cb in full["callbacks"]:
        if cb["name"] == "critic":
            cb["critic"] = critic
    without = copy.deepcopy(full)
    without["callbacks"] = [cb for cb in without["callbacks"] if cb["name"] != "critic"]
    without["steps"] = nfe  # the loop's budget goes to plain steps instead
    guidance_only = copy.deepcopy(full)
    guidance_only["steps"] = nfe
    for cb in guidance_only["callbacks"]:
        if cb["name"] == "critic":
            cb["retries"] = 0
    out = {"without critic": without, "critic correction": guidance_only}
    if any(cb.get("retries", 1) > 0 for cb in full["callbacks"] if cb["name"] == "critic"):
        out["critic correction + loop"] = full
    return {name: Recipe.from_dict({k: v for k, v in spec.items() if k != "name"}, name=name) for name, spec in out.items()}


def run(recipe: Recipe, denoiser, n: int, seed: int, batch: int) -> tuple[SampleSet, dict]:
    """:func:`peers.run_ours` plus the critic's flag summary (weighted over chunks) and the max NFE."""
    summaries, nfe = [], []

    def keep(r: SampleResult) -> None:
        summaries.append((len(r.nfe), flag_summary(r.extras)))
        nfe.append(r.nfe)

    samples = run_ours(recipe, denoiser, n, seed, batch, on_chunk=keep)
    summary = {k: sum(w * s[k] for w, s in summaries) / n for k in summaries[0][1]} if summaries[0][1] else {}
    summary["nfe_max"] = float(torch.cat(nfe).max())
    return samples, summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--critic", required=True)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10], choices=sorted(RECIPES))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    torch.set_num_threads(2)

    denoiser = load_model(args.ckpt)
    extractor, f_real = reference_for("digits")
    train = digits_split("train").flatten(1).double()

    critic = load_critic(args.critic)

    def nn_median(images01: torch.Tensor) -> float:
        return float(torch.cdist(images01.flatten(1).double(), train).min(1).values.median())

    def filters(s: SampleSet) -> dict[str, float]:
        """FD after dropping the 20% the critic (t=0) likes least, over FD after a random 20%."""
        f_fake = extract_features(s.images, extractor)
        logit = torch.cat([critic(x * 2 - 1, torch.zeros(len(x), dtype=torch.long)) for x in s.images.split(500)])
        out = fd_after_filtering(f_real, f_fake, -logit, drop=0.2, seeds=range(5))
        return {"critic_filter_ratio": out["fd_drop_uncertain"] / out["fd_drop_random_mean"]}

    rows = []
    for seed in args.seeds:
        x_T = NoiseSource(seed, range(args.n)).draw(tuple(denoiser.image_shape))
        for nfe in args.nfe:
            for name in ("diffusers-ddim", "diffusers-dpm++2m", "diffusers-unipc"):
                s = run_diffusers(name, nfe, denoiser, x_T, seed, args.batch)
                rows.append({"seed": seed, "budget": nfe, "sampler": name, "nfe_max": float(nfe), **filters(s),
                             "nn_train_median": nn_median(s.images), **evaluate_sample_set(s, f_real, extractor)})
            for name, recipe in variants(RECIPES[nfe], args.critic, nfe).items():
                s, summary = run(recipe, denoiser, args.n, seed, args.batch)
                rows.append({"seed": seed, "budget": nfe, "sampler": name, **summary, **filters(s),
                             "nn_train_median": nn_median(s.images), **evaluate_sample_set(s, f_real, extractor)})
            for r in rows[-(3 + len(variants(RECIPES[nfe], args.critic, nfe))):]:
                print(f"seed {seed} budget {nfe:3d} {r['sampler']:26s} NFE {r['nfe']:5.2f} (max {r['nfe_max']:.0f}) "
                      f"FD {r['fd']:.3f} KID {r['kid']:.3f} {r['seconds']:.1f}s", flush=True)
    columns = ["seed", "budget", "sampler", "nfe", "nfe_max", "fd", "kid", "precision", "recall", "seconds",
               "critic_calls_mean", "flagged_share", "retries_mean", "critic_filter_ratio", "fd_ratio_uncertain_vs_random",
               "nn_train_median"]
    rows_out = [{k: v for k, v in r.items() if not isinstance(v, dict)} for r in rows]
    real_val = digits_split("val")
    payload = {"ckpt": args.ckpt, "critic": args.critic, "n": args.n, "rows": rows_out,
               "real_val_nn_train_median": nn_median(real_val)}
    write_results(args.out, "critic_guidance", payload, rows_out, columns)
    print(f"real validation digits: median distance to the nearest training digit {payload['real_val_nn_train_median']:.3f}")


if __name__ == "__main__":
    main()
