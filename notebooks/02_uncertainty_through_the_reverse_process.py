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
# # 2. Uncertainty through the reverse process
#
# Where and when is the denoiser unsure while it generates? We record, at every step of a
# DDIM run, the x0 estimate, the epistemic variance (spread over weight samples), the
# aleatoric variance (the variance head) and the propagated variance of x_t, then ask whether
# the finished uncertainty sits on the strokes' edges, and whether the predicted variances are
# calibrated on held-out digits.

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

from bdiff.analysis import (
    edge_uncertainty_correlation,
    image_grid,
    record_stack,
    reliability_figure,
    resolve_checkpoint,
    show,
    step_trace,
    to_unit,
)
from bdiff.checkpoint import load_model
from bdiff.datasets import digits_split
from bdiff.metrics.calibration import calibration_at_t, reliability_at_t
from bdiff.sampling import DDIM, Sampler
from bdiff.sampler_callbacks import Recorder, RecorderOutput

torch.manual_seed(SEED)
STEPS = 10 if FAST else 50
N_SHOW = 2 if FAST else 4  # samples whose reverse process we show
N_BATCH = 16 if FAST else 128  # samples for the edge statistics
N_VAL = 64 if FAST else None  # held-out digits for calibration (None: all)
CAL_T = (50, 500) if FAST else (10, 100, 250, 500, 900)

ckpt_path = resolve_checkpoint(CKPT)
denoiser = load_model(ckpt_path)
print(f"checkpoint: {ckpt_path}; Bayesian parameters: {denoiser.model.bayesian_names or 'none'}")

# %% [markdown]
# ## One reverse process, step by step
#
# The Recorder keeps the chosen tensors after every step for the first few samples.

# %%
keys = ("x0", "var_epistemic", "var_aleatoric", "var")
sampler = Sampler(denoiser, DDIM(), steps=STEPS, callbacks=[Recorder(keys=keys, max_samples=N_SHOW)])
result = sampler.sample(N_SHOW, seed=SEED)
records = result.output(RecorderOutput).records  # one dict per step
t_at_prediction = step_trace(records)  # (S, N_SHOW): the t each step's prediction was made at
stacks = {k: record_stack(records, k) for k in keys}  # each (S, N_SHOW, C, H, W)
print(f"{len(records)} steps recorded, NFE per sample: {result.nfe.tolist()}")

# %% [markdown]
# ## Strips over the steps
#
# For each sample: the x0 estimate and the three variance maps at a handful of steps (column
# title: the t the prediction was made at). Each variance map has its own colour scale, so the
# strip shows *where* the uncertainty is; the next plot shows how large it is.

# %%
n_cols = min(6, len(records))
cols = torch.linspace(0, len(records) - 1, n_cols).round().long()
for i in range(N_SHOW):
    rows = {
        "x0 estimate": to_unit(stacks["x0"][cols, i]),
        "epistemic var": stacks["var_epistemic"][cols, i],
        "aleatoric var": stacks["var_aleatoric"][cols, i],
        "propagated var": stacks["var"][cols, i],
    }
    cmaps = {"x0 estimate": "gray", "epistemic var": "magma", "aleatoric var": "magma", "propagated var": "magma"}
    titles = [f"t={int(t_at_prediction[c, i])}" for c in cols]
    show(image_grid(rows, col_titles=titles, title=f"sample {i}", cmap=cmaps))

# %% [markdown]
# ## How large the uncertainty is along the way
#
# Mean per-pixel variance against the timestep (the process runs right to left). The
# epistemic and aleatoric variances are in noise (eps) space; the propagated variance is that
# of x_t itself, the quantity that becomes the finished image's uncertainty map.

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
t_axis = t_at_prediction[:, 0].clamp(min=0).numpy()
for k, label in (("var_epistemic", "epistemic (eps)"), ("var_aleatoric", "aleatoric (eps)"), ("var", "propagated (x_t)")):
    mean_var = stacks[k].flatten(2).mean(2).mean(1)
    ax.plot(t_axis, mean_var.where(mean_var > 0, torch.nan).numpy(), marker=".", label=label)  # log axis: drop zeros
ax.set_yscale("log")
ax.invert_xaxis()
ax.set_xlabel("timestep t (reverse process runs left to right)")
ax.set_ylabel("mean per-pixel variance")
ax.set_title("Uncertainty along the reverse process")
ax.legend()
fig.tight_layout()
show(fig)

# %% [markdown]
# ## Does the finished uncertainty sit on the edges?
#
# We sample a larger batch and correlate each image's per-pixel std with the Sobel edge
# magnitude of the finished image. A positive correlation means the model is unsure where
# strokes begin and end, not in the flat background.

# %%
batch = Sampler(denoiser, DDIM(), steps=STEPS).sample(N_BATCH, seed=SEED + 1)
edges = edge_uncertainty_correlation(batch.images, batch.variance)
print(f"pooled correlation(std, edge magnitude) = {edges['pooled']:.3f}")
print(f"mean std on edge pixels {edges['edge_std']:.3g} vs background {edges['background_std']:.3g}")
show(
    image_grid(
        {"sample": to_unit(batch.images[:6]), "Sobel edges": edges["edge"][:6], "std": edges["std"][:6]},
        col_titles=[f"r={float(r):.2f}" for r in edges["per_sample"][:6]],
        title="Finished samples, their edges and their uncertainty (r: per-image correlation)",
        cmap={"sample": "gray", "Sobel edges": "viridis", "std": "magma"},
    )
)

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
ax1.hist(edges["per_sample"].numpy(), bins=20)
ax1.axvline(0, color="k", linewidth=1)
ax1.set_xlabel("per-image correlation(std, edge magnitude)")
ax1.set_ylabel("images")
ax1.set_title("Uncertainty vs edges, per image")
ax2.scatter(edges["edge"].flatten().numpy(), edges["std"].flatten().numpy(), s=2, alpha=0.3)
ax2.set_xlabel("Sobel edge magnitude")
ax2.set_ylabel("per-pixel std")
ax2.set_title(f"All pixels (pooled r = {edges['pooled']:.2f})")
fig.tight_layout()
show(fig)

# %% [markdown]
# ## Calibration on held-out digits
#
# At a few timesteps we noise real validation digits, predict the noise and compare the
# squared error with the predicted variance. z2 = mean(err^2 / var) is 1 when calibrated,
# above 1 when the model is over-confident. The reliability diagrams bin pixels by predicted
# variance; points on the diagonal are calibrated.

# %%
x0_val = digits_split("val") * 2 - 1
if N_VAL is not None:
    x0_val = x0_val[:N_VAL]
cal = calibration_at_t(denoiser, x0_val, CAL_T, torch.Generator().manual_seed(SEED))
print(f"{'t':>5}{'mse':>10}{'z2 aleatoric':>14}{'z2 total':>10}{'z2 epistemic':>14}")
for r in cal:
    fmt = lambda v: "n/a" if v is None else f"{v:.3g}"  # noqa: E731
    print(f"{r['t']:>5}{r['mse']:>10.3g}{fmt(r['z2_aleatoric']):>14}{fmt(r['z2_total']):>10}{fmt(r['z2_epistemic']):>14}")
curves = {t: reliability_at_t(denoiser, x0_val, t, torch.Generator().manual_seed(SEED), bins=10) for t in CAL_T[:3]}
show(reliability_figure(curves, title=f"Reliability on {len(x0_val)} held-out digits"))
