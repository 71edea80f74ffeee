"""Can a GP on the bottleneck reach a held-out/seen epistemic ratio of 2? Variants on one held-out class.

    python benchmarks/gp_variants.py --heldout 3      # the tuning class of benchmarks/heldout_class.py

Uses the held-out-class run that ``benchmarks/heldout_class.py`` trains (``runs/heldout/
digits_without<c>_seed0_3000steps``). For each variant, the GP's posterior variance v(h) of the
seen-class validation images and of the held-out class at t in {50, 100, 250, 500} (the same
fixed noise as the benchmark), their ratio of means, the AUROC of v for telling the class apart,
and the median ratio over those t (the issue's target: >= 2). v is what the bottleneck GP adds to
the epistemic variance, up to the factor s(t) that seen and held-out images share, so these
ratios are the GP's part of ``heldout_class.py``'s ratio.

Variants (activations at random t, 8 noisings per training image): the random-feature GP the
library had until the eighth session (D 2,048, lengthscale 0.5 x the median distance, noise 0.1),
with a smaller noise, other lengthscales and more features; and an exact subset-of-data GP (the
same RBF kernel on M random training activations, no feature approximation), to separate the
approximation from the features it reads.

``--where`` asks instead where in the network a GP should look: the same exact GP (M 4,096,
lengthscale 0.5 x the median distance, noise 0.01) on each level of the encoder (the stem and
every down level's activations, the bottleneck, all levels average-pooled) and on the network's
own x0 estimate (the 64 pixels of the denoised image), and the product of the bottleneck's and the
x0 estimate's kernels; 4 noisings per training image. Writes
``gp_where_class<c>.json``.

    python benchmarks/gp_variants.py --heldout 3 --runs runs/heldout_cos --where

``--per-t`` asks whether the GP should compare an image only with training images at its own noise
level: at each t, an exact GP on the bottleneck activations of the training images noised at that
t (3 noisings each; M 4,096, noise 0.01), lengthscale 0.25, 0.5 or 1 x that t's median distance;
then the chosen lengthscale as 512 or 2,048 random Fourier features on all of that t's activations,
or exact on 1,024 or 2,048 of them (forms a checkpoint can hold per t-knot). Writes ``gp_per_t_class<c>.json``.

``--nearest`` scores the library's GP, :class:`~bdiff.bayes.bottleneck_gp.BottleneckGP` (a GP per
t-knot on the top principal axes of that knot's activations, each query conditioned on its nearest
training activations, interpolated between knots in log-SNR), over its settings: 20 knots with 8,
16, 32, 64, 128 or all 1,024 axes, then 40 knots with 32 axes, each with 16, 32 or 64 neighbours;
plus what the GP's variance costs beside one forward of the network (256 images at random t).
Writes ``gp_nearest_class<c>.json``.

    python benchmarks/gp_variants.py --heldout 3 --runs runs/heldout_cos --nearest    # and --heldout 5, 8
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
from torchmetrics.functional.classification import binary_auroc

from bdiff.bayes.bottleneck_gp import BottleneckGP
from bdiff.checkpoint import load_model
from common import RESULTS, ROOT, write_json
from heldout_class import split_images

TIMESTEPS = (50, 100, 250, 500)
RFF_VARIANTS = {"D 2048, noise 0.1 (the library's form until the eighth session)": (2048, 0.5, 0.1),
                "noise 0.01": (2048, 0.5, 0.01), "lengthscale 0.3": (2048, 0.3, 0.1),
                "lengthscale 1.0": (2048, 1.0, 0.1), "features 4096": (4096, 0.5, 0.1)}
"""Random-feature GPs on activations at random t: (features, lengthscale x median distance, noise)."""
EXACT_VARIANTS = [(m, ell, noise) for m in (2048, 4096) for ell in (0.25, 0.5) for noise in (0.1, 0.01)]


@torch.no_grad()
def bottleneck(den, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Flattened bottleneck activations (N, d) of x0 (N,C,H,W) noised to t (N,) with ``noise``."""
    return den.model.net.encode(den.schedule.q_sample(x0, t, noise), t)[0].flatten(1)


def fixed(x0: torch.Tensor, t: int) -> torch.Tensor:
    """The bottleneck of x0 at t with heldout_class.py's fixed noise for that t (seed 1)."""
    return torch.randn(x0.shape, generator=torch.Generator().manual_seed(1000 + t))


def scored_activations(den, seen: torch.Tensor, held: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{t: (seen, held) bottleneck activations} at each of TIMESTEPS, with heldout_class.py's fixed noise."""
    return {t: tuple(bottleneck(den, x, torch.full((len(x),), t), fixed(x, t)) for x in (seen, held)) for t in TIMESTEPS}


def score_each_t(variance_at, acts: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> list[dict]:
    """:func:`score`'s per-t rows for a GP that differs per t: ``variance_at(t)`` is the v(h) to use at t."""
    return [score(f"t = {t}", variance_at(t), {t: acts[t]})["per_t"][0] for t in acts]


def standardise(train: torch.Tensor, ell_mult: float, g: torch.Generator, blocks: list[int] | None = None):
    """Per-column centre and scale of ``train`` (N, d), and per block of columns the RBF lengthscale in standardised
    units: ell_mult x the median distance between 2,000 random rows (the median heuristic)."""
    center, scale = train.mean(0), train.std(0).clamp_min(1e-6)
    z = (train - center) / scale
    pick = torch.randperm(len(z), generator=g)[:2000]
    return center, scale, [ell_mult * float(torch.cdist(part, part).median()) for part in z[pick].split(blocks or [z.shape[1]], 1)]


def exact_gp(train: torch.Tensor, m: int, ell_mult: float, noise: float, seed: int = 0,
             blocks: list[int] | None = None):
    """v(h) of an exact RBF GP on m random rows of ``train`` (N, d), standardised, lengthscale ell_mult x median distance.

    ``blocks`` (sizes summing to d) makes the kernel a product of one RBF per block of columns, each
    with its own lengthscale (ell_mult x that block's median distance), so a small block counts as
    much as a large one.
    """
    g = torch.Generator().manual_seed(seed)
    center, scale, ells = standardise(train, ell_mult, g, blocks)
    scale = scale * torch.cat([torch.full((n,), ell, dtype=train.dtype) for n, ell in zip(blocks or [train.shape[1]], ells)])
    zm = ((train - center) / scale)[torch.randperm(len(train), generator=g)[:m]]
    chol = torch.linalg.cholesky(torch.exp(-torch.cdist(zm, zm) ** 2 / 2) + noise * torch.eye(m, dtype=zm.dtype))

    def variance(h: torch.Tensor) -> torch.Tensor:
        k = torch.exp(-torch.cdist((h.double() - center) / scale, zm) ** 2 / 2)
        return (1 - torch.linalg.solve_triangular(chol, k.T, upper=False).pow(2).sum(0)).clamp_min(0)

    return variance


def score(name: str, variance, acts: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    per_t = []
    for t, (seen, held) in acts.items():
        vs, vh = variance(seen).float(), variance(held).float()
        labels = torch.cat([torch.zeros(len(vs)), torch.ones(len(vh))]).long()
        per_t.append({"t": t, "ratio": float(vh.mean() / vs.mean()), "auroc": float(binary_auroc(torch.cat([vs, vh]), labels)),
                      "v_seen": float(vs.mean())})
    row = {"variant": name, "median_ratio": statistics.median(r["ratio"] for r in per_t), "per_t": per_t}
    print(name, round(row["median_ratio"], 3), [(r["t"], round(r["ratio"], 2), round(r["auroc"], 2)) for r in per_t], flush=True)
    return row


@torch.no_grad()
def where_features(den, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """{place: (N, d) float64} of x0 (N,C,H,W) noised to t (N,): each encoder level, all pooled, the x0 estimate."""
    x_t = den.schedule.q_sample(x0, t, noise)
    h, skips, _ = den.model.net.encode(x_t, t)
    out = {f"encoder level {i} ({tuple(a.shape[1:])})": a.flatten(1) for i, a in enumerate(skips)}
    out[f"bottleneck ({tuple(h.shape[1:])})"] = h.flatten(1)
    out["every level, average-pooled"] = torch.cat([a.mean((2, 3)) for a in [*skips, h]], 1)
    out["the x0 estimate (pixels)"] = den.schedule.eps_to_x0(x_t, t, den.predict(x_t, t).eps).clamp(-1, 1).flatten(1)
    out[BOTH] = torch.cat([h.flatten(1), out["the x0 estimate (pixels)"]], 1)
    return {k: v.double() for k, v in out.items()}


BOTH = "bottleneck x the x0 estimate (product kernel)"


def where_rows(den, train_x: torch.Tensor, seen: torch.Tensor, held: torch.Tensor) -> list[dict]:
    """The exact GP (M 4096, lengthscale 0.5, noise 0.01) on each place of :func:`where_features`."""
    acts = {t: [where_features(den, x, torch.full((len(x),), t), fixed(x, t)) for x in (seen, held)]
            for t in TIMESTEPS}
    g = torch.Generator().manual_seed(0)
    train: dict[str, list[torch.Tensor]] = {}
    for x0 in train_x.split(256):
        for _ in range(4):
            t = torch.randint(0, den.schedule.timesteps, (len(x0),), generator=g)
            for k, v in where_features(den, x0, t, torch.randn(x0.shape, generator=g)).items():
                train.setdefault(k, []).append(v)
    pixels = train_x[0].numel()
    out = []
    for place, rows in train.items():
        width = rows[0].shape[1]
        gp = exact_gp(torch.cat(rows), 4096, 0.5, 0.01, blocks=[width - pixels, pixels] if place == BOTH else None)
        out.append(score(place, gp, {t: (a[0][place], a[1][place]) for t, a in acts.items()}))
    return out


PER_T_LENGTHSCALES = (0.25, 0.5, 1.0)
PER_T_FEATURES = (512, 2048)
PER_T_SUBSETS = (1024, 2048)
"""Random-feature sizes and training subsets tried for the per-t GP at the chosen lengthscale (what a checkpoint
could hold per t-knot: a (D, D) covariance or an (M, M) Cholesky factor)."""


def random_fourier_basis(dim: int, features: int, lengthscale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequencies (dim, D) ~ N(0, 1/lengthscale^2) and phases (D,) ~ U(0, 2 pi) of an RBF kernel's random features
    (Rahimi & Recht 2007)."""
    g = torch.Generator().manual_seed(seed)
    freqs = torch.randn(dim, features, generator=g, dtype=torch.float64) / lengthscale
    return freqs, 2 * math.pi * torch.rand(features, generator=g, dtype=torch.float64)


def rff_gp(train: torch.Tensor, features: int, ell_mult: float, noise: float, seed: int = 0):
    """v(h) of :func:`exact_gp`'s GP approximated by ``features`` random Fourier features on all of ``train``
    (the form the library's bottleneck GP had until the eighth session: a (D, D) covariance)."""
    center, scale, (ell,) = standardise(train, ell_mult, torch.Generator().manual_seed(seed))
    freqs, phases = random_fourier_basis(train.shape[1], features, ell, seed + 1)

    def phi(h: torch.Tensor) -> torch.Tensor:
        return (2.0 / features) ** 0.5 * torch.cos(((h.double() - center) / scale) @ freqs + phases)

    p = phi(train)
    covariance = noise * torch.cholesky_inverse(torch.linalg.cholesky(p.T @ p + noise * torch.eye(features, dtype=p.dtype)))

    def variance(h: torch.Tensor) -> torch.Tensor:
        f = phi(h)
        return ((f @ covariance) * f).sum(1).clamp_min(0)

    return variance


def per_t_rows(den, train_x: torch.Tensor, seen: torch.Tensor, held: torch.Tensor) -> list[dict]:
    """For each form of GP: at every t one fitted on training activations at that t alone, scored there."""
    acts = scored_activations(den, seen, held)
    g = torch.Generator().manual_seed(0)
    train = {t: torch.cat([bottleneck(den, x0, torch.full((len(x0),), t), torch.randn(x0.shape, generator=g)).double()
                           for x0 in train_x.split(256) for _ in range(3)]) for t in TIMESTEPS}
    fits = {f"lengthscale {ell}": lambda x, ell=ell: exact_gp(x, 4096, ell, 0.01) for ell in PER_T_LENGTHSCALES}
    # the chosen lengthscale, 0.5, in forms a checkpoint can hold per t-knot
    fits |= {f"lengthscale 0.5, {d} random features": lambda x, d=d: rff_gp(x, d, 0.5, 0.01) for d in PER_T_FEATURES}
    fits |= {f"lengthscale 0.5, exact on {m} training activations": lambda x, m=m: exact_gp(x, m, 0.5, 0.01)
             for m in PER_T_SUBSETS}
    rows = []
    for name, fit in fits.items():
        per_t = score_each_t(lambda t: fit(train[t]), acts)
        rows.append({"variant": f"GP per t, {name}", "median_ratio": statistics.median(r["ratio"] for r in per_t),
                     "per_t": per_t})
        print(rows[-1]["variant"], round(rows[-1]["median_ratio"], 3), flush=True)
    return rows


NEAREST_DIMS = (8, 16, 32, 64, 128, 1024)
NEAREST_NEIGHBOURS = (16, 32, 64)
"""Principal axes per knot and neighbours per query tried for the library's GP (20 knots); then 40 knots at 32 axes."""


def gp_cost(den, gp: BottleneckGP, rounds: int = 7) -> float:
    """Median seconds of ``gp.gp_variance`` over one deterministic forward: 256 images at random t, interleaved."""
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(256, 1, 8, 8, generator=g), torch.randint(0, den.schedule.timesteps, (256,), generator=g)
    h = den.model.net.encode(x_t, t)[0].flatten(1)
    ratios = []
    for _ in range(rounds):
        start = time.perf_counter()
        gp.gp_variance(h, t)
        mid = time.perf_counter()
        den.model.net(x_t, t)
        ratios.append((mid - start) / (time.perf_counter() - mid))
    return statistics.median(ratios)


@torch.no_grad()
def nearest_rows(den, train_x: torch.Tensor, seen: torch.Tensor, held: torch.Tensor) -> list[dict]:
    """The library's GP (:class:`BottleneckGP`: per t-knot, principal axes, nearest neighbours) over its settings."""
    acts = scored_activations(den, seen, held)
    rows = []
    for knots, dims in [(20, d) for d in NEAREST_DIMS] + [(40, 32)]:
        gp = BottleneckGP.fit(den.model, den.schedule, train_x.split(256), knots=knots, dims=dims)
        for m in NEAREST_NEIGHBOURS:
            gp.neighbours = m
            per_t = score_each_t(lambda t: lambda h: gp.gp_variance(h, torch.full((len(h),), t)), acts)
            rows.append({"variant": f"knots {knots}, dims {dims}, neighbours {m}", "knots": knots, "dims": dims,
                         "neighbours": m, "median_ratio": statistics.median(r["ratio"] for r in per_t),
                         "median_auroc": statistics.median(r["auroc"] for r in per_t),
                         "cost_vs_forward": gp_cost(den, gp), "per_t": per_t})
            print(rows[-1]["variant"], round(rows[-1]["median_ratio"], 3), round(rows[-1]["median_auroc"], 3),
                  round(rows[-1]["cost_vs_forward"], 3), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heldout", type=int, default=3)
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "heldout")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--where", action="store_true", help="compare where the GP looks (encoder levels, the x0 estimate)")
    p.add_argument("--per-t", action="store_true", help="a GP per t, fitted on training activations at that t only")
    p.add_argument("--nearest", action="store_true", help="the library's GP (per t-knot, nearest neighbours) over its settings")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    found = sorted(args.runs.glob(f"digits_without{args.heldout}_seed0_3000steps/**/checkpoints/last.ckpt"))
    if not found:
        raise SystemExit(f"error: no held-out run for class {args.heldout} under {args.runs}; "
                         f"run python benchmarks/heldout_class.py --classes {args.heldout} first")
    den = load_model(found[0])
    train_x, seen, held = split_images(args.heldout)
    if args.where or args.per_t or args.nearest:
        mode = "where" if args.where else "per_t" if args.per_t else "nearest"
        rows = {"where": where_rows, "per_t": per_t_rows, "nearest": nearest_rows}[mode](den, train_x, seen, held)
        stem = f"gp_{mode}"
        write_json(args.out / f"{stem}_class{args.heldout}.json", rows)
        return
    acts = scored_activations(den, seen, held)
    g = torch.Generator().manual_seed(0)
    train = []
    for x0 in train_x.split(256):  # 8 noisings of each training image at t ~ U{0..T-1}
        for _ in range(8):
            t = torch.randint(0, den.schedule.timesteps, (len(x0),), generator=g)
            train.append(bottleneck(den, x0, t, torch.randn(x0.shape, generator=g)).double())
    train_acts = torch.cat(train)
    rows = [score(f"random features, {name}", rff_gp(train_acts, d, ell, noise), acts)
            for name, (d, ell, noise) in RFF_VARIANTS.items()]
    for m, ell, noise in EXACT_VARIANTS:
        rows.append(score(f"exact GP, M {m}, lengthscale {ell}, noise {noise}", exact_gp(train_acts, m, ell, noise), acts))
    write_json(args.out / f"gp_variants_class{args.heldout}.json", rows)


if __name__ == "__main__":
    main()
