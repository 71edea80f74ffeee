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
# # 4. Ranking a batch by its uncertainty
#
# Every finished sample carries a per-pixel uncertainty map, so a batch can be ordered by it.
# Does the order mean anything? We put the most and least uncertain samples of a large batch
# side by side, then plot each sample's mean variance against a quality proxy: the distance
# from its features to the nearest real digit's, in the feature space of a small classifier
# trained on the real digits (the space our FD/KID use).

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

from bdiff.analysis import image_grid, resolve_checkpoint, show, side_by_side_extremes, to_unit
from bdiff.checkpoint import load_model
from bdiff.datasets import digits_split
from bdiff.lit.feature_module import ensure_feature_nets
from bdiff.metrics.features import default_cache_dir, get_feature_extractor
from bdiff.metrics.frechet import extract_features
from bdiff.metrics.usefulness import (
    auroc_worst, fd_after_filtering, nearest_real_distance, per_sample_uncertainty, sample_score, spearman,
)
from bdiff.sampling.recipe import load_recipe

torch.manual_seed(SEED)
N = 48 if FAST else 1000
K = 6 if FAST else 10
RECIPE = "unipc"  # any recipe under configs/sampler/

ckpt_path = resolve_checkpoint(CKPT)
denoiser = load_model(ckpt_path)
print(f"checkpoint: {ckpt_path}; Bayesian parameters: {denoiser.model.bayesian_names or 'none'}")

# %%
recipe = load_recipe(Path("configs/sampler") / f"{RECIPE}.yaml")
denoiser.num_samples = recipe.posterior_samples
result = recipe.build(denoiser).sample(N, seed=SEED)
u = per_sample_uncertainty(result.variance)  # (N,) mean per-pixel variance
print(f"{N} samples with {RECIPE} in {result.seconds:.1f}s; mean variance from {u.min():.3g} to {u.max():.3g}")

# %% [markdown]
# ## Most and least uncertain samples
#
# Left block: the K samples the model is surest about, with their uncertainty maps; right
# block: the K it is least sure about. All maps share one colour scale.

# %%
ext = side_by_side_extremes(result.images, result.variance, K)
vmax = float(ext["most_variance"].mean(1).max())
fig = image_grid(
    {
        "least uncertain": to_unit(ext["least_images"]),
        "their variance": ext["least_variance"],
        "most uncertain": to_unit(ext["most_images"]),
        "their variance ": ext["most_variance"],
    },
    title="Ranked by mean per-pixel variance",
    cmap={"least uncertain": "gray", "their variance": "magma", "most uncertain": "gray", "their variance ": "magma"},
)
for ax in fig.axes:
    for im in ax.get_images():
        if im.get_cmap().name == "magma":
            im.set_clim(0, vmax)
show(fig)

# %% [markdown]
# ## Uncertainty against quality
#
# Quality proxy: the distance from each sample's features to its nearest real training digit
# (larger = less like any real digit). The feature net is trained on the first call and cached
# under `$BDIFF_CACHE/features` (default `~/.cache/bdiff/features`). A useful uncertainty puts the
# far-off samples on the right: a positive Spearman correlation, and an AUROC above 0.5 for
# flagging the worst 20%.

# %%
ensure_feature_nets(["digits"])  # trains it when the cache has none (seconds on a CPU)
extractor = get_feature_extractor("digits")
print(f"feature net from {default_cache_dir()}")
f_real = extract_features(digits_split("train"), extractor)  # (N_real, 64)
f_fake = extract_features(to_unit(result.images), extractor)  # (N, 64)
d = nearest_real_distance(f_fake, f_real)  # (N,)
rho, auroc = spearman(u, d), auroc_worst(u, d, fraction=0.2)
print(f"Spearman(uncertainty, distance) = {rho:.3f}; AUROC for the worst 20% = {auroc:.3f}")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
ax1.scatter(u.numpy(), d.numpy(), s=8, alpha=0.5)
ax1.set_xscale("log")
ax1.set_xlabel("mean per-pixel variance (uncertainty)")
ax1.set_ylabel("distance to nearest real digit (features)")
ax1.set_title(f"Uncertainty vs quality (Spearman {rho:.2f})")
n_bins = 5 if FAST else 10
order = u.argsort()
groups = order.tensor_split(n_bins)
ax2.bar(range(1, n_bins + 1), [float(d[g].mean()) for g in groups])
ax2.set_xlabel("uncertainty bin (1 = most confident)")
ax2.set_ylabel("mean distance to nearest real")
ax2.set_title("Quality per uncertainty bin (equal counts)")
fig.tight_layout()
show(fig)

# %% [markdown]
# ## Filtering by uncertainty
#
# The Frechet distance (in the same features) of the whole batch, after dropping its most
# uncertain 20%, and after dropping a random 20% (mean over 5 draws). Uncertainty helps when
# dropping by it beats dropping at random. Raw mean variance grows with the amount of ink, so
# the raw ranking drops heavy-ink digits as a group and FD punishes the lost mode; the score
# `bdiff.sample` stores and `--keep` filters by (`sample_score`: each sample's rank among ~50
# look-alikes, k-means clusters of the batch's pixels) keeps the mix of digits.

# %%
ranked = {"raw mean variance": u,
          "the shipped score (rank among look-alikes)": sample_score(result.images, result.variance)}
for name, score in ranked.items():
    fd = fd_after_filtering(f_real, f_fake, score, drop=0.2)
    print(
        f"{name}: FD all {fd['fd_all']:.3f}; drop most uncertain 20%: {fd['fd_drop_uncertain']:.3f}; "
        f"drop random 20%: {fd['fd_drop_random_mean']:.3f} +- {fd['fd_drop_random_std']:.3f} ({fd['n_kept']} kept)"
    )
