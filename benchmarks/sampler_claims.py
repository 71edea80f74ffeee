"""Sampler claims that survive a second opinion (issue 14): our best recipe per budget vs the best peer.

    # 1. choose, on one training run and one sampling seed: every candidate recipe and every peer
    python benchmarks/sampler_claims.py choose --run A=runs/bdiff/<id>/checkpoints/last.ckpt --seeds 1
    # 2. report, on that run and another training run, with two other sampling seeds
    python benchmarks/sampler_claims.py report --run A=runs/bdiff/<id>/... --run B=runs/bdiff/<id2>/... --seeds 0 2

The rules (top of BENCHMARKS.md): settings are chosen in step 1 only; step 2 reports them on
another training run (a second ``seed_everything``) and two other sampling seeds; FD, KID and
precision/recall in every feature space the evaluator has (``bdiff.metrics.features``: the
digits CNN, an MLP classifier from another seed, raw pixels); the bar per budget and feature
space is the best peer: diffusers' DDIM, DPM-Solver++(2M) and UniPC on the leading, linspace,
trailing and Karras grids (DDIM has no Karras mode), and, once ``benchmarks/peer_bar.py`` has run
every solver, grid and option diffusers offers on the choose cell, the best 3 of those per budget
and feature space (:func:`extra_peers`). A recipe "wins" only if its FD is below the bar in every
space, on every run and seed.

Candidates are families of uncertainty- and critic-driven recipes, of UniPC's bh1 variant and order 3 (with
and without a second-order step before the last), of the x0 estimate clipped to [-1, 1], of grids fitted to the run's
checkpoint, of epsilon scaling on those grids (constant and with a slope in t), and of guidance by
a second critic that learns the model's ODE rather than a 10-step solver (:data:`ODE_CRITIC_FAKES`;
:func:`candidates`,
:mod:`bdiff.sampling.fitted_grid`, :mod:`bdiff.sampler_callbacks.eps_scaling`); step 1
picks, per budget, the candidate with the lowest *worst-space* FD ratio to the best peer
(``sampler_claims_choice.json``; choosing only some ``--budgets`` keeps the others' earlier
choices) and the best member of every other family (the "what was tried"
rows that step 2 also reruns). Each run gets its own critic, trained against its checkpoint
with ``configs/critic/digits.yaml``'s recipe and cached under ``runs/critic/claims-<run id>``.
Filtering: FD after dropping the 20% of samples with the highest score over FD after dropping a
random 20%, for the sample's propagated uncertainty (plain, and ranked within k-means clusters of
look-alike samples: ``bdiff.metrics.usefulness.uncertainty_within_clusters``), the critic's final
score, and the rank average of the clustered uncertainty and the critic's score. Writes ``benchmarks/results/<stem>.json`` and ``<stem>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from functools import cache, cached_property, partial
from pathlib import Path
from typing import Any

import torch

from bdiff.checkpoint import load_model
from bdiff.metrics.frechet import extract_features
from bdiff.metrics.report import classifier_confidence, quality_from_features
from bdiff.metrics.usefulness import fd_after_filtering, per_sample_uncertainty, uncertainty_within_clusters
from bdiff.sampling.noise import NoiseSource
from bdiff.sampling.sampler import SampleResult
from bdiff.sampler_callbacks.critic import CriticOutput
from bdiff.sampling.unipc import UniPC
from common import RESULTS, ROOT, recipe_file, references_for, short_recipe, write_json, write_results
from peers import FIRST_11_SOLVERS, Peer, bar_from, diverged, first_11, in_old_bar, parse_run, run_ours, run_peer
BUDGETS = (5, 10, 20)
PEER_BAR_CHOOSE = RESULTS / "peer_bar_choose.json"
"""Every diffusers option on the choose cell (``benchmarks/peer_bar.py``): its best join the bar (:func:`extra_peers`)."""
EXTRA_PEERS_TOP = 3
"""Configurations per budget and feature space that join the bar from :data:`PEER_BAR_CHOOSE`."""
FIRST_11 = tuple(f"{name}, " for name in FIRST_11_SOLVERS)
"""Label prefixes of the first 11 configurations' rows (the extra ones read ``diffusers <Peer.label>``)."""
OUR_GRIDS = {"leading": {"name": "leading"}, "linspace": {"name": "linspace"}, "trailing": {"name": "trailing"},
             "karras5": {"name": "karras", "rho": 5.0}, "karras7": {"name": "karras", "rho": 7.0}}
FITTED_GRIDS = {"fitted": {"name": "fitted"}, "fitted from T-1": {"name": "fitted", "late_start": False}}
"""Grids fitted to the run's checkpoint (:mod:`bdiff.sampling.fitted_grid`): starting where the fit says, or at T-1."""
STEPPER_GRIDS = {**FITTED_GRIDS, "leading": OUR_GRIDS["leading"]}
"""The grids the stepper families (UniPC bh1, order 3, x0 clipping) are tried on."""
TOLERANCES = {5: (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5), 10: (0.1, 0.15, 0.2, 0.25, 0.3), 20: (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)}
"""Adaptive step control's tolerances tried per budget (a first sweep had three per budget and its best sat at an end)."""
EPS_SCALES = (0.98, 0.99, 0.995, 0.998, 1.002, 1.005, 1.01, 1.02, 1.04)
"""Epsilon scaling's constant lambda tried on the fitted grids (:mod:`bdiff.sampler_callbacks.eps_scaling`)."""
EPS_SLOPES = {"scale": (0.99, 0.995, 1.0, 1.005), "slope": (-0.02, -0.01, 0.01, 0.02)}
"""Epsilon scaling with lambda_t = scale + slope * t/(T-1) (Ning et al.'s linear schedule), on each budget's
``SLOPE_GRID``: the grid its best constant lambda was chosen on."""
SLOPE_GRID = {5: "fitted", 10: "fitted from T-1", 20: "fitted"}
CLIP_STEPPERS = {"unipc": "unipc", "unipc bh1": {"name": "unipc", "variant": "bh1"},
                 "unipc-3 bh1": {"name": "unipc", "variant": "bh1", "order": 3},
                 "unipc-3 bh2 to the end": {"name": "unipc", "variant": "bh2", "order": 3, "lower_order_final": False}}
"""The steppers tried with the x0 estimate clipped to [-1, 1] (:mod:`bdiff.sampler_callbacks.clip_x0`): the ``--nfe`` entries'
and order 3 (clipping rescued diffusers' order 3 on steep grids at 5 NFE in the peer screen)."""
CRITIC_PLACEHOLDER = "<critic of the run>"  # each run's own critic is put in at sampling time
ODE_CRITIC_PLACEHOLDER = "<ODE critic of the run>"
ODE_CRITIC_FAKES = {"recipe": {"stepper": {"name": "dpmpp_2m"}, "steps": 50, "spacing": "leading", "posterior_samples": 8},
                    "fakes_per_real": 5}
"""The second critic's data: 5 generated digits per real one from the probability-flow ODE's own answer (50
DPM-Solver++(2M) steps, no better than 20 in the classifier spaces), so it learns the model's errors rather
than a 10-step solver's (the first critic's fakes: ``configs/sampler/dpmpp.yaml``, 1 per real one)."""
ODE_CRITIC_WEIGHTS = (0.5, 1.0, 2.0, 4.0)
CRITIC = {"name": "critic", "weight": 2.0, "t_range": [0, 999], "threshold": 1.0}
NFE_ENTRY_ROWS = {5: "unipc-3 bh2 to the end, fitted", 10: "unipc, fitted from T-1", 20: "unipc bh1, leading"}
"""The rows that measure :data:`bdiff.sampling.budget.BEST_RECIPES`, what ``--nfe`` runs; :func:`check_entry_rows`
keeps them in step."""


def candidates(nfe: int, critic: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """{name: (family, recipe dict)} of every recipe tried at a budget of ``nfe`` denoiser calls per sample."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for tol in TOLERANCES[nfe]:
        adaptive = {"name": "adaptive", "tol": tol, "max_extra_nfe": 2}  # base steps nfe - 2: the budget holds
        out[f"unipc + adaptive tol {tol}"] = ("adaptive", {"stepper": "unipc", "steps": nfe - 2, "callbacks": [adaptive]})
        out[f"unipc + adaptive tol {tol} + critic"] = ("adaptive+critic", {
            "stepper": "unipc", "steps": nfe - 2, "callbacks": [adaptive, {**CRITIC, "critic": critic, "retries": 0}]})
    for grid, spacing in OUR_GRIDS.items():
        refine = {"name": "refine", "tol": 0.5, "jump": 100, "t_range": [50, 400], "max_passes": 1}
        out[f"unipc {nfe - 1} + refine tol 0.5, {grid}"] = (
            "refine", {"stepper": "unipc", "steps": nfe - 1, "spacing": spacing, "callbacks": [refine]})
        out[f"unipc + critic, {grid}"] = ("critic", {
            "stepper": "unipc", "steps": nfe, "spacing": spacing, "callbacks": [{**CRITIC, "critic": critic, "retries": 0}]})
        loop = {**CRITIC, "critic": critic, "retries": 1, "t_back": 100, "max_nfe": nfe}
        out[f"unipc {nfe - 1} + critic + 1 re-denoise from t=100, {grid}"] = (
            "critic+loop", {"stepper": "unipc", "steps": nfe - 1, "spacing": spacing, "callbacks": [loop]})
        if grid in ("trailing", "karras5"):
            out[f"dpmpp_2m + blend, {grid}"] = (
                "blend", {"stepper": "dpmpp_2m", "steps": nfe, "spacing": spacing, "callbacks": [{"name": "blend"}]})
    for grid, spacing in FITTED_GRIDS.items():
        for stepper in ("unipc", "dpmpp_2m"):
            out[f"{stepper}, {grid}"] = ("fitted grid", {"stepper": stepper, "steps": nfe, "spacing": spacing})
        out[f"unipc + critic, {grid}"] = ("fitted grid+critic", {
            "stepper": "unipc", "steps": nfe, "spacing": spacing, "callbacks": [{**CRITIC, "critic": critic, "retries": 0}]})
        for scale in EPS_SCALES:
            out[f"unipc + eps scaling {scale}, {grid}"] = ("eps scaling", {
                "stepper": "unipc", "steps": nfe, "spacing": spacing, "callbacks": [{"name": "eps_scaling", "scale": scale}]})
    for grid, spacing in STEPPER_GRIDS.items():
        out[f"unipc bh1, {grid}"] = ("unipc bh1", {"stepper": {"name": "unipc", "variant": "bh1"}, "steps": nfe, "spacing": spacing})
    for grid, spacing in STEPPER_GRIDS.items():
        for variant in UniPC.VARIANTS:
            stepper = {"name": "unipc", "variant": variant, "order": 3}
            out[f"unipc-3 {variant}, {grid}"] = ("unipc order 3", {"stepper": stepper, "steps": nfe, "spacing": spacing})
            out[f"unipc-3 {variant} to the end, {grid}"] = (
                "unipc order 3 to the end", {"stepper": {**stepper, "lower_order_final": False}, "steps": nfe, "spacing": spacing})
    for grid, spacing in STEPPER_GRIDS.items():
        for label, stepper in CLIP_STEPPERS.items():
            out[f"{label} + clip x0, {grid}"] = (
                "clip x0", {"stepper": stepper, "steps": nfe, "spacing": spacing, "callbacks": [{"name": "clip_x0"}]})
    grid = SLOPE_GRID.get(nfe, "fitted")
    for weight in ODE_CRITIC_WEIGHTS:
        out[f"unipc + ODE critic w {weight}, {grid}"] = ("fitted grid+ODE critic", {
            "stepper": "unipc", "steps": nfe, "spacing": FITTED_GRIDS[grid],
            "callbacks": [{**CRITIC, "critic": ODE_CRITIC_PLACEHOLDER, "retries": 0, "weight": weight}]})
    for scale in EPS_SLOPES["scale"]:
        for slope in EPS_SLOPES["slope"]:
            out[f"unipc + eps scaling {scale} slope {slope:+}, {grid}"] = ("eps scaling slope", {
                "stepper": "unipc", "steps": nfe, "spacing": FITTED_GRIDS[grid],
                "callbacks": [{"name": "eps_scaling", "scale": scale, "slope": slope}]})
    return out


def check_entry_rows() -> None:
    """ValueError unless each of :data:`NFE_ENTRY_ROWS` names the recipe ``--nfe`` runs at its budget."""
    from bdiff.sampling.budget import BEST_RECIPES

    for nfe, name in NFE_ENTRY_ROWS.items():
        entry = BEST_RECIPES[nfe]
        if name.startswith("diffusers-"):
            solver, _, grid = name.partition(", ")
            same = (entry.get("spacing"), entry["stepper"]) == (grid, {"diffusers-dpm++2m": "dpmpp_2m", "diffusers-unipc": "unipc"}.get(solver))
        else:
            same = candidates(nfe, CRITIC_PLACEHOLDER)[name][1] == entry
        if not same:
            raise ValueError(f"NFE_ENTRY_ROWS[{nfe}] = {name!r} is not what --nfe {nfe} runs ({entry}): update it")


def ranks(score: torch.Tensor) -> torch.Tensor:
    """(N,) ranks 0..N-1 of ``score`` (ties broken by position)."""
    out = torch.empty_like(score, dtype=torch.float64)
    out[score.argsort(stable=True)] = torch.arange(len(score), dtype=torch.float64)
    return out


def score_row(images: torch.Tensor, references: dict, filters: dict[str, torch.Tensor]) -> dict[str, float]:
    """Quality (FD, KID, precision, recall, confidence) per space of images (N,C,H,W) in [0, 1], and for each
    filter score (N,) (higher = drop first) FD after dropping its top 20% over FD after a random 20%."""
    row: dict[str, float] = {}
    for space, (extractor, f_real) in references.items():
        f_fake = extract_features(images, extractor)
        for key, value in quality_from_features(f_real, f_fake).items():
            row[f"{space}/{key}"] = value
        confidence = classifier_confidence(images, extractor)
        if confidence is not None:
            row[f"{space}/confidence"] = confidence
        for name, score in filters.items():
            filtered = fd_after_filtering(f_real, f_fake, score, drop=0.2, seeds=range(5))
            row[f"{space}/filter_{name}"] = filtered["fd_drop_uncertain"] / filtered["fd_drop_random_mean"]
    return row


class Run:
    """One training run: its denoiser, and the critics some families need (each trained on first use, cached)."""

    def __init__(self, label: str, ckpt: Path) -> None:
        self.label, self.ckpt = label, ckpt
        self.denoiser = load_model(ckpt)
        self.run_id = ckpt.resolve().parents[1].name
        os.environ.setdefault("WANDB_MODE", "disabled")

    @cached_property
    def critic(self) -> str:
        """The run's critic (``configs/critic/digits.yaml``'s recipe), trained on first use (~4 min on 2 CPU cores)."""
        from bdiff.lit.critic_module import cached_critic

        out_dir = ROOT / "runs" / "critic" / f"claims-{self.run_id}"
        return str(cached_critic(self.ckpt, out_dir, sampler=str(ROOT / "configs" / "sampler" / "dpmpp.yaml")))

    @cached_property
    def ode_critic(self) -> str:
        """The run's second critic (:data:`ODE_CRITIC_FAKES`), trained on first use (~6 min on 2 CPU cores), cached."""
        import yaml

        from bdiff.lit.critic_module import cached_critic

        out_dir = ROOT / "runs" / "critic" / f"claims-ode-{self.run_id}"
        out_dir.mkdir(parents=True, exist_ok=True)
        recipe = out_dir / "fakes_recipe.yaml"
        recipe.write_text(yaml.safe_dump(recipe_file(ODE_CRITIC_FAKES["recipe"])))
        return str(cached_critic(self.ckpt, out_dir, sampler=str(recipe), fakes_per_real=ODE_CRITIC_FAKES["fakes_per_real"]))


@cache
def peer_screen() -> dict[str, Any] | None:
    """:data:`PEER_BAR_CHOOSE`'s payload, read once per process; None before ``benchmarks/peer_bar.py`` ran."""
    return json.loads(PEER_BAR_CHOOSE.read_text()) if PEER_BAR_CHOOSE.is_file() else None


def extra_peers(nfe: int) -> list[Peer]:
    """The bar's configurations beyond the first 11 at ``nfe``: the best per feature space of every diffusers
    option on the choose cell (``benchmarks/peer_bar.py``, :data:`PEER_BAR_CHOOSE`; measured on 2,000 samples;
    :data:`EXTRA_PEERS_TOP` per space); none before that ran."""
    screen = peer_screen()
    if screen is None:
        return []
    return [p for p in bar_from(screen["rows"], EXTRA_PEERS_TOP).get(nfe, []) if not in_old_bar(p)]


def peer_rows(run: Run, seed: int, nfe: int, n: int, references: dict, done: set[str]) -> list[dict[str, Any]]:
    """Every bar configuration at ``nfe`` steps not in ``done`` (labels): the first 11 (:func:`peers.first_11`)
    and :func:`extra_peers`."""
    x_T = NoiseSource(seed, range(n)).draw(tuple(run.denoiser.image_shape))
    runs: dict[str, Callable[[], Any]] = {}
    for label, peer in first_11().items():
        runs[label] = partial(run_peer, peer, nfe, run.denoiser, x_T, 1000)
    for peer in extra_peers(nfe):
        runs[f"diffusers {peer.label}"] = partial(run_peer, peer, nfe, run.denoiser, x_T, 1000)
    screened = screened_rows(run, seed, nfe, n)
    rows = []
    for name, sample in runs.items():
        if name in done:
            continue
        if name in screened:  # the same configuration, network, noise and scoring: peer_bar.py's row as it is
            scores = {k: v for k, v in screened[name].items() if "/" in k}
            rows.append({"run": run.label, "seed": seed, "budget": nfe, "sampler": name, "family": "peer",
                         "nfe": float(nfe), "nfe_max": float(nfe), **scores})
        else:
            samples = sample()
            if diverged(samples):  # an extra configuration that blows up on this cell
                print(f"{run.label} seed {seed} NFE {nfe} {name}: not finite, left out of the bar", flush=True)
                continue
            rows.append({"run": run.label, "seed": seed, "budget": nfe, "sampler": name, "family": "peer",
                         "nfe": samples.nfe, "nfe_max": samples.nfe, **score_row(samples.images, references, {})})
        report(rows[-1], references)
    return rows


def screened_rows(run: Run, seed: int, nfe: int, n: int) -> dict[str, dict]:
    """{"diffusers <Peer.label>": row} of :data:`PEER_BAR_CHOOSE` on this run (same label and checkpoint), seed,
    budget and sample count."""
    payload = peer_screen()
    if payload is None:
        return {}
    checkpoints = {label: Path(ckpt).resolve() for label, ckpt, _ in map(parse_run, payload["runs"])}
    if payload["n"] != n or checkpoints.get(run.label) != run.ckpt.resolve():
        return {}
    return {f"diffusers {r['sampler']}": r for r in payload["rows"] if r["family"] == "peer"
            and (r["run"], r["seed"], r["budget"]) == (run.label, seed, nfe) and not r.get("diverged")}


def recipe_row(run: Run, seed: int, nfe: int, n: int, name: str, family: str, spec: dict, references: dict) -> dict:
    """One of our recipes: quality per space, NFE used (mean, max) and the filters' ratios."""
    text = json.dumps(spec)
    for placeholder, network in ((CRITIC_PLACEHOLDER, "critic"), (ODE_CRITIC_PLACEHOLDER, "ode_critic")):
        if placeholder in text:
            text = text.replace(placeholder, getattr(run, network))
    template, spec = spec, json.loads(text)
    nfe_used, logits = [], []

    def keep(r: SampleResult) -> None:
        nfe_used.append(r.nfe.float())
        critic = r.output(CriticOutput)
        logits.append(critic.final_logit if critic is not None else torch.full((len(r.nfe),), float("nan")))

    samples = run_ours(short_recipe(spec, name=name), run.denoiser, n, seed, 1000, on_chunk=keep)
    nfe_all, logit = torch.cat(nfe_used), torch.cat(logits).double()
    filters = {"uncertainty": per_sample_uncertainty(samples.variance).double(),
               "uncertainty_in_clusters": uncertainty_within_clusters(samples.images, samples.variance)}
    if torch.isfinite(logit).all():
        filters["critic"] = -logit  # low logit = looks generated
        filters["uncertainty+critic"] = ranks(filters["uncertainty_in_clusters"]) + ranks(-logit)
    row = {"run": run.label, "seed": seed, "budget": nfe, "sampler": name, "family": family, "recipe": template,
           "nfe": float(nfe_all.mean()), "nfe_max": float(nfe_all.max()), **score_row(samples.images, references, filters)}
    report(row, references)
    return row


def report(row: dict, references: dict) -> None:
    print(f"{row['run']} seed {row['seed']} NFE {row['budget']:2d} {row['sampler']:58s} "
          + "  ".join(f"{s} {row[f'{s}/fd']:.3f}" for s in references) + f"  (NFE {row['nfe']:.2f}/{row['nfe_max']:.0f})",
          flush=True)


def with_ratios(rows: list[dict], spaces: list[str]) -> list[dict]:
    """Adds ``<space>/ratio`` (FD / best peer's FD at the same run, seed, budget) and ``worst_ratio``."""
    for row in rows:
        peers = [r for r in rows if r["family"] == "peer" and (r["run"], r["seed"], r["budget"]) ==
                 (row["run"], row["seed"], row["budget"])]
        for space in spaces:
            best = min(peers, key=lambda r: r[f"{space}/fd"])
            row[f"{space}/ratio"] = row[f"{space}/fd"] / best[f"{space}/fd"]
            row[f"{space}/best_peer"] = best["sampler"]
        row["worst_ratio"] = max(row[f"{s}/ratio"] for s in spaces)
    return rows


def choose(rows: list[dict]) -> dict[int, dict[str, Any]]:
    """Per budget: the candidate with the lowest worst-space ratio (within budget), and each family's best."""
    out = {}
    for nfe in sorted({r["budget"] for r in rows}):
        ours = [r for r in rows if r["budget"] == nfe and r["family"] != "peer" and r["nfe_max"] <= nfe]
        best_of = {}
        for r in sorted(ours, key=lambda r: r["worst_ratio"]):
            best_of.setdefault(r["family"], r)
        winner = min(ours, key=lambda r: r["worst_ratio"])
        out[nfe] = {"winner": winner["sampler"], "recipes": {r["sampler"]: [r["family"], r["recipe"]] for r in best_of.values()}}
    return out


def _span(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def summary_table(rows: list[dict], spaces: list[str], choice: dict) -> str:
    """Markdown per budget: the best peer per space, then every recipe's FD ratio to it (range over runs and
    seeds), whether it is <= 0.8x everywhere, its precision minus the best peer's, and the filters' ratios."""
    lines = []
    for nfe, picked in sorted(choice.items(), key=lambda kv: int(kv[0])):
        at = [r for r in rows if r["budget"] == int(nfe)]
        cells = sorted({(r["run"], r["seed"]) for r in at})
        lines.append(f"\n### {nfe} NFE (chosen on the tuning run: {picked['winner']})\n")
        lines.append("| best peer (FD) | " + " | ".join(f"{run} seed {seed}" for run, seed in cells) + " |")
        lines.append("|---|" + "---|" * len(cells))
        for space in spaces:
            best = [min((r for r in at if r["family"] == "peer" and (r["run"], r["seed"]) == c),
                        key=lambda r: r[f"{space}/fd"]) for c in cells]
            lines.append(f"| {space} | " + " | ".join(f"{b[space + '/fd']:.3g} ({b['sampler']})" for b in best) + " |")
            if any(r["family"] == "peer" and not r["sampler"].startswith(FIRST_11) for r in at):
                first = [min((r for r in at if r["sampler"].startswith(FIRST_11) and (r["run"], r["seed"]) == c),
                             key=lambda r: r[f"{space}/fd"]) for c in cells]
                lines.append(f"| {space}, first 11 only | " + " | ".join(
                    f"{b[space + '/fd']:.3g} ({b['sampler']})" for b in first) + " |")
        lines.append("")
        head = ["recipe", *[f"{s} FD / best peer" for s in spaces], "<= 0.8x everywhere",
                *[f"{s} precision - peer's" for s in spaces], *[f"{s} filter (clusters)" for s in spaces]]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|---|" + "---|" * (len(head) - 1))
        for name in dict.fromkeys(r["sampler"] for r in at if r["family"] != "peer"):
            mine = [r for r in at if r["sampler"] == name]
            ratios = {s: [r[f"{s}/ratio"] for r in mine] for s in spaces}
            holds = all(v <= 0.8 for vals in ratios.values() for v in vals)
            dprec = {s: [r[f"{s}/precision"] - next(p for p in at if p["sampler"] == r[f"{s}/best_peer"] and
                                                       (p["run"], p["seed"]) == (r["run"], r["seed"]))[f"{s}/precision"]
                         for r in mine] for s in spaces}
            filt = {s: [r[f"{s}/filter_uncertainty_in_clusters"] for r in mine if f"{s}/filter_uncertainty_in_clusters" in r]
                    for s in spaces}
            label = f"**{name}**" if name == picked["winner"] else name
            lines.append(f"| {label} | " + " | ".join(_span(ratios[s]) for s in spaces) + f" | {'yes' if holds else 'no'} | "
                         + " | ".join(f"{min(v):+.2f}" + (f"..{max(v):+.2f}" if len(v) > 1 else "") for v in dprec.values())
                         + " | "
                         + " | ".join(_span(v) if v else "" for v in filt.values()) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], spaces: list[str], choice: dict, path: Path) -> None:
    """FD vs NFE per feature space: the best peer of each (run, seed) cell, UniPC on diffusers' default
    (linspace) grid, and what ``--nfe`` runs (:data:`NFE_ENTRY_ROWS`); points are means over the cells, bars their range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_entry_rows()
    budgets = sorted(int(b) for b in choice)
    cells = sorted({(r["run"], r["seed"]) for r in rows})
    fig, axes = plt.subplots(1, len(spaces), figsize=(4 * len(spaces), 3.4))
    for ax, space in zip(axes, spaces):
        lines = {
            "best diffusers peer (any solver, grid)": lambda at: min(r[f"{space}/fd"] for r in at if r["family"] == "peer"),
            "diffusers UniPC, linspace": lambda at: next(r[f"{space}/fd"] for r in at if r["sampler"] == "diffusers-unipc, linspace"),
            "ours: what --nfe runs": lambda at: next(
                r[f"{space}/fd"] for r in at if r["sampler"] == NFE_ENTRY_ROWS[at[0]["budget"]]),
        }
        for label, value in lines.items():
            per = [[value([r for r in rows if r["budget"] == b and (r["run"], r["seed"]) == c]) for c in cells] for b in budgets]
            mean = [sum(v) / len(v) for v in per]
            err = [[m - min(v) for m, v in zip(mean, per)], [max(v) - m for m, v in zip(mean, per)]]
            ax.errorbar(budgets, mean, yerr=err, marker="o", capsize=3, label=label)
        ax.set(xscale="log", yscale="log", xlabel="NFE (denoiser calls per sample)", ylabel="FD", title=f"{space} features")
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"2,000 samples; mean and range over {len(cells)} (training run, sampling seed) cells", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=["choose", "report", "summarise"],
                   help="summarise: rewrite <stem>_summary.md and the plot <stem>_fd.png from <stem>.json (no sampling)")
    p.add_argument("--run", nargs="+", default=[], help="label=checkpoint, one per training run")
    p.add_argument("--seeds", type=int, nargs="+", default=[])
    p.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stem", default=None, help="results file name (default sampler_claims[_choose])")
    p.add_argument("--families", nargs="+", default=None, help="choose: only these candidate families")
    p.add_argument("--append", action="store_true",
                   help="choose: add to the earlier choose results (same run and seed) instead of replacing them")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.phase == "summarise":
        stem = args.stem or "sampler_claims"
        payload = json.loads((RESULTS / f"{stem}.json").read_text())
        spaces = sorted({k.split("/")[0] for k in payload["rows"][0] if k.endswith("/fd")})
        (RESULTS / f"{stem}_summary.md").write_text(summary_table(payload["rows"], spaces, payload["choice"]) + "\n")
        plot(payload["rows"], spaces, payload["choice"], RESULTS / f"{stem}_fd.png")
        return
    if not args.run or not args.seeds:
        p.error("choose and report need --run and --seeds")
    references = references_for()
    spaces = list(references)
    choice_file = RESULTS / "sampler_claims_choice.json"
    choice = json.loads(choice_file.read_text()) if args.phase == "report" else None
    stem = args.stem or ("sampler_claims_choose" if choice is None else "sampler_claims")
    earlier = json.loads((RESULTS / f"{stem}.json").read_text())["rows"] if args.append else []
    rows: list[dict] = []
    for item in args.run:
        label, _, path = item.partition("=")
        run = Run(label, Path(path))
        for seed in args.seeds:
            for nfe in args.budgets:
                measured = {r["sampler"] for r in earlier if r["family"] == "peer" and
                            (r["run"], r["seed"], r["budget"]) == (label, seed, nfe)}
                rows += peer_rows(run, seed, nfe, args.n, references, measured)  # --append keeps those measured
                tried = (candidates(nfe, CRITIC_PLACEHOLDER) if choice is None else
                         {name: tuple(v) for name, v in choice[str(nfe)]["recipes"].items()})
                done = {r["sampler"] for r in earlier if (r["run"], r["seed"], r["budget"]) == (label, seed, nfe)}
                for name, (family, spec) in tried.items():
                    if name not in done and (args.families is None or family in args.families):
                        rows.append(recipe_row(run, seed, nfe, args.n, name, family, spec, references))
    rows = with_ratios(earlier + rows, spaces)
    payload = {"runs": args.run, "seeds": args.seeds, "n": args.n, "rows": rows}
    if choice is None:  # re-choosing some budgets keeps the other budgets' earlier choices
        kept = json.loads(choice_file.read_text()) if choice_file.is_file() else {}
        choice = {**kept, **{str(k): v for k, v in choose(rows).items()}}
        choice = dict(sorted(choice.items(), key=lambda kv: int(kv[0])))
        write_json(choice_file, choice)
    payload["choice"] = choice = {b: v for b, v in choice.items() if any(r["budget"] == int(b) for r in rows)}
    columns = ["run", "seed", "budget", "sampler", "nfe", "nfe_max", "worst_ratio",
               *[f"{s}/{k}" for s in spaces for k in ("fd", "kid", "precision", "recall")]]
    write_results(RESULTS, stem, payload, rows, columns)
    summary = summary_table(rows, spaces, choice)
    (RESULTS / f"{stem}_summary.md").write_text(summary + "\n")
    plot(rows, spaces, choice, RESULTS / f"{stem}_fd.png")
    print(summary)


if __name__ == "__main__":
    main()
