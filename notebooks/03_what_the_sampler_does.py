# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. What the sampler does with the uncertainty
#
# The same seeds (so the same starting noise) through recipes in `configs/sampler/` (plain
# DPM-Solver++ and UniPC, and UniPC on a timestep grid fitted to this checkpoint: `unipc_fitted`;
# `--nfe 5` runs it with UniPC of order 3) and through the sampler callbacks that read the
# posterior: blending with the history, adaptive step sizes, and all of them together with
# refinement of uncertain regions. Each reads the mean's stated error (epistemic variance times
# r(t)), so each is its base sampler where r(t) = 0. No shipped recipe uses them: on the default
# model they make FD worse than the same solver without them; adaptive steps pay only on a model
# trained on 10% of the digits (BENCHMARKS.md, "Uncertainty in the sampler"), so they are built
# inline here. We compare the finished images
# and uncertainty maps, the blending gains, the step-size traces and the number of denoiser
# calls (NFE) each sample cost.

# %% tags=["parameters"]
CKPT = None  # a checkpoint path; None: the newest Bayesian runs/bdiff/*/checkpoints/last.ckpt
FAST = False  # small mode for CI
SEED = 0

# %%
import os
from pathlib import Path

if Path.cwd().name == "notebooks" and Path("../bdiff").is_dir():  # Jupyter started in notebooks/
    os.chdir("..")  # paths below (configs/, runs/) are relative to the repo root

import matplotlib.pyplot as plt
import torch

from bdiff.analysis import image_grid, resolve_checkpoint, show, step_sizes, step_trace, to_unit
from bdiff.checkpoint import load_model
from bdiff.sampling import DPMSolverPP2M, UniPC
from bdiff.sampler_callbacks import (
    AdaptiveStepSize, BlendOutput, Recorder, RecorderOutput, UncertainRegionRefinement, VarianceWeightedBlending,
)
from bdiff.sampling.recipe import Recipe, load_recipe

torch.manual_seed(SEED)
N = 8 if FAST else 16
RECIPES = {name: load_recipe(Path("configs/sampler") / f"{name}.yaml") for name in ("dpmpp", "unipc", "unipc_fitted")}
EXPERIMENTS = {  # the posterior-driven callbacks, in the order the sampler runs them
    "dpmpp+blend": Recipe(DPMSolverPP2M(), 10, callbacks=[VarianceWeightedBlending()]),
    "dpmpp+every callback": Recipe(DPMSolverPP2M(), 10, callbacks=[
        VarianceWeightedBlending(), AdaptiveStepSize(tol=0.5, max_extra_nfe=3),
        UncertainRegionRefinement(tol=0.5, jump=50, t_range=(50, 600), max_passes=1)]),
    "unipc+adaptive": Recipe(UniPC(), 5, callbacks=[AdaptiveStepSize(tol=0.25, max_extra_nfe=3)]),
}

ckpt_path = resolve_checkpoint(CKPT)
denoiser = load_model(ckpt_path)
print(f"checkpoint: {ckpt_path}; Bayesian parameters: {denoiser.model.bayesian_names or 'none'}")
if denoiser.is_bayesian and denoiser.error_scale is None:  # a checkpoint without r(t): fit it (seconds)
    from bdiff.recalibrate import fit_for_checkpoint

    denoiser.error_scale = fit_for_checkpoint(ckpt_path, denoiser)
if denoiser.is_bayesian:  # blending needs epistemic variance
    RECIPES.update(EXPERIMENTS)

# %% [markdown]
# ## Run every recipe on the same seeds
#
# Each recipe gets a Recorder appended (it records t after every step, and the propagated
# variance). Sample i depends only on (seed, i), so column i starts from the same noise in
# every row.

# %%
results = {}
for name, recipe in RECIPES.items():
    denoiser.num_samples = recipe.posterior_samples
    sampler = recipe.build(denoiser)
    sampler.callbacks.append(Recorder(keys=("var",), max_samples=N, max_records=1000))
    results[name] = (sampler, sampler.sample(N, seed=SEED))
    res = results[name][1]
    print(
        f"{name:<18} callbacks={[type(c).__name__ for c in recipe.callbacks]}  mean NFE={res.nfe.float().mean():.1f}  "
        f"mean var={res.variance.mean():.3g}  {res.seconds:.2f}s"
    )

# %% [markdown]
# ## Finished samples and their uncertainty maps
#
# Top block: the samples of each recipe; bottom block: their propagated per-pixel variance,
# on one colour scale for all recipes, so brighter means more uncertain everywhere.

# %%
k = min(N, 8)
show(image_grid({name: to_unit(res.images[:k]) for name, (_, res) in results.items()},
                col_titles=[f"seed {SEED}, #{i}" for i in range(k)], title="Samples (same noise per column)"))
vmax = max(float(res.variance[:k].mean(1).max()) for _, res in results.values())
fig = image_grid({name: res.variance[:k] for name, (_, res) in results.items()},
                 col_titles=[f"#{i}" for i in range(k)], title="Finished uncertainty maps (variance)", cmap="magma")
for ax in fig.axes:
    for im in ax.get_images():
        im.set_clim(0, vmax)
show(fig)

# %% [markdown]
# ## How different are the samples?
#
# RMS pixel difference of each recipe's samples from plain DPM-Solver++ on the same seeds:
# how much the uncertainty-driven callbacks actually change the outcome.

# %%
base = results["dpmpp"][1].images
for name, (_, res) in results.items():
    diff = (res.images - base).pow(2).flatten(1).mean(1).sqrt()
    print(f"{name:<22} RMS difference from dpmpp: mean {diff.mean():.3f}, max {diff.max():.3f}")

# %% [markdown]
# ## Blending gains
#
# The Kalman gain K (mean over pixels of the active samples) at each step: K = 1 takes the
# new prediction as is, K < 1 leans on the history of earlier predictions. Its R is the epistemic
# variance in the units of the mean's error (fitted per t on held-out images, `bdiff.bayes.error_scale`):
# where this checkpoint is as accurate on unseen digits as on its training digits, K = 1.

# %%
fig, ax = plt.subplots(figsize=(6, 3.2))
for name, (_, res) in results.items():
    blend = res.output(BlendOutput)  # None: the recipe has no blending
    if blend is not None:
        gains = blend.gain
        ax.plot(range(2, len(gains) + 2), gains, marker="o", label=name)
ax.set_xlabel("step")
ax.set_ylabel("mean Kalman gain K")
ax.set_ylim(0, 1.05)
ax.set_title("How much each step trusts its new prediction")
ax.legend()
fig.tight_layout()
show(fig)

# %% [markdown]
# ## Step-size traces and cost
#
# Left: t against the loop iteration for every sample (one line per sample, log scale). Fixed-grid
# recipes give one line; adaptive ones fan out where a sample's stated error makes the controller
# halve a step (at most `max_extra_nfe` times). Right: NFE per sample (refinement passes and
# halvings count as calls); the base recipes take 10 calls (`unipc+adaptive` and `unipc_fitted`: 5),
# so the callbacks' extra calls show here. `unipc_fitted`'s five timesteps are the ones with the least summed local error
# along finely solved ODE trajectories of this checkpoint (dynamic programming,
# `bdiff.sampling.fitted_grid`); the first use on a checkpoint fits them (about a minute on a
# CPU) and caches the fit.

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
for c, (name, (sampler, res)) in enumerate(results.items()):
    trace = step_trace(res.output(RecorderOutput).records)  # (S, N): t each step started from
    full = torch.cat([trace, torch.full_like(trace[:1], -1)]).clamp(min=0)  # and where the last one ended
    for i in range(full.shape[1]):
        ax1.plot(full[:, i].numpy(), color=f"C{c}", alpha=0.5, label=name if i == 0 else None)
ax1.set_xlabel("loop iteration")
ax1.set_yscale("symlog", linthresh=10)
ax1.set_ylabel("timestep t (0 = finished)")
ax1.set_title("Timestep per iteration, per sample")
ax1.legend(fontsize=7)
names = list(results)
nfe = [results[n][1].nfe.float() for n in names]
means = torch.stack([v.mean() for v in nfe])
spread = torch.stack([means - torch.stack([v.min() for v in nfe]), torch.stack([v.max() for v in nfe]) - means])
ax2.bar(range(len(names)), means.numpy(), yerr=spread.numpy(), capsize=4, color=[f"C{i}" for i in range(len(names))])
ax2.set_xticks(range(len(names)), names, rotation=25, ha="right")
ax2.set_ylabel("NFE per sample")
ax2.set_title("Denoiser calls per sample (mean, min-max)")
fig.tight_layout()
show(fig)

# %%
for name, (sampler, res) in results.items():
    sizes = step_sizes(res.output(RecorderOutput).records)
    print(f"{name:<22} step sizes of sample 0: {sizes[0].tolist()}")
