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
# # 5. What the critic sees, and what it changes
#
# The posterior variance says where the *model* is unsure; a critic trained on real data says
# where the *result* looks wrong. Here: how well the critic tells real from generated images at
# each noise level, which samples it flags, where in an image its gradient points (beside the
# propagated uncertainty map), and what the correction and the re-denoising loop do to a batch
# drawn from the same noise.

# %% tags=["parameters"]
CKPT = None  # a diffusion checkpoint; None: the newest Bayesian runs/bdiff/*/checkpoints/last.ckpt
CRITIC = None  # a critic checkpoint; None: runs/critic/digits/checkpoints/last.ckpt, else a short one is trained
FAST = False  # small mode for CI
SEED = 0

# %%
import os
import tempfile
from pathlib import Path

if Path.cwd().name == "notebooks" and Path("../bdiff").is_dir():  # Jupyter started in notebooks/
    os.chdir("..")  # paths below (configs/, runs/) are relative to the repo root

import matplotlib.pyplot as plt
import torch
from sklearn.metrics import roc_auc_score

from bdiff.analysis import image_grid, resolve_checkpoint, show, to_unit
from bdiff.checkpoint import load_model
from bdiff.critic import load_critic
from bdiff.datasets import digits_split
from bdiff.sampling import DPMSolverPP2M
from bdiff.sampler_callbacks.critic import CriticCorrection, CriticOutput
from bdiff.sampling.recipe import Recipe, load_recipe

torch.manual_seed(SEED)
N = 48 if FAST else 500

ckpt_path = resolve_checkpoint(CKPT)
denoiser = load_model(ckpt_path)
if CRITIC is None and Path("runs/critic/digits/checkpoints/last.ckpt").is_file() and not FAST:
    CRITIC = "runs/critic/digits/checkpoints/last.ckpt"
if CRITIC is None:  # train a short one against this checkpoint (about a minute; FAST: a few seconds)
    from bdiff.lit.critic_module import train_critic

    CRITIC = train_critic(ckpt_path, tempfile.mkdtemp(prefix="bdiff-critic-"), max_epochs=1 if FAST else 20,
                          sampler="configs/sampler/ddim.yaml" if FAST else "configs/sampler/dpmpp.yaml")
critic = load_critic(CRITIC)
print(f"diffusion checkpoint: {ckpt_path}\ncritic: {CRITIC}")

# %% [markdown]
# ## How well does it tell real from generated, per noise level?
# AUROC of the critic's logit on held-out real digits against fresh samples (DPM-Solver++, 10 steps),
# both forward-noised to t. At t near 999 everything is noise (AUROC 0.5); the critic's
# gradient matters where it still separates the two.

# %%
plain = load_recipe("configs/sampler/dpmpp.yaml")
fakes = plain.build(denoiser).sample(N, seed=SEED + 1).images
real = digits_split("val") * 2 - 1
real = real[: len(fakes)]
ts = [0, 50, 100, 200, 300, 500, 700, 900]
aurocs = []
g = torch.Generator().manual_seed(SEED)
for t in ts:
    x = torch.cat([real, fakes])
    tt = torch.full((len(x),), t, dtype=torch.long)
    x_t = critic.schedule.q_sample(x, tt, torch.randn(x.shape, generator=g))
    logit = critic(x_t, tt)
    labels = torch.cat([torch.ones(len(real)), torch.zeros(len(fakes))])
    aurocs.append(roc_auc_score(labels.numpy(), logit.numpy()))
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(ts, aurocs, "-o")
ax.axhline(0.5, color="grey", lw=0.8)
ax.set_xlabel("t")
ax.set_ylabel("AUROC real vs generated")
fig.tight_layout()
show(fig)

# %% [markdown]
# ## The samples it likes least and most
# The critic's logit at t=0 on finished samples: the 8 it finds least real, and the 8 most real.

# %%
logit0 = critic(fakes, torch.zeros(len(fakes), dtype=torch.long))
order = logit0.argsort()
show(image_grid({"least real": to_unit(fakes[order[:8]]), "most real": to_unit(fakes[order.flip(0)[:8]])},
                title="critic logit at t=0 on finished samples"))
print(f"share the critic calls fake (logit < 0): {(logit0 < 0).float().mean():.2f}")

# %% [markdown]
# ## Where in an image: the critic's gradient beside the propagated uncertainty
# For the flagged samples, |d logit / dx| at t=0 and the per-pixel std the sampler propagated.
# Region mode re-does the pixels where their product is large.

# %%
result = plain.build(denoiser).sample(N, seed=SEED + 1)
_, grad = critic.logit_and_grad(result.images, torch.zeros(N, dtype=torch.long))
flagged = order[:8]
rows = {"sample": to_unit(result.images[flagged]), "|gradient|": grad[flagged].abs(), "std": result.variance[flagged].sqrt()}
show(image_grid(rows, cmap={"sample": "gray", "|gradient|": "magma", "std": "magma"}, title="least-real samples"))

# %% [markdown]
# ## What the correction and the loop change, from the same noise
# Same 10-call budget: plain DPM-Solver++(2M), with the critic's correction, and with correction
# plus the re-denoising loop: weight 2, threshold 1, one pass back from t = 100 within 10 calls (no
# shipped recipe uses the critic: on the default model it made FD worse than the same solver
# without it; BENCHMARKS.md, "Uncertainty in the sampler: what does not help").

# %%
def corrected(steps: int, retries: int) -> Recipe:
    """DPM-Solver++(2M) with the critic's correction (weight 2 everywhere) and up to ``retries`` passes back."""
    correction = CriticCorrection(critic, weight=2.0, t_range=(0, 999), threshold=1.0, retries=retries,
                                  t_back=100, max_nfe=10)
    return Recipe(DPMSolverPP2M(), steps, posterior_samples=8, callbacks=[correction])


runs = {"plain": plain, "correction": corrected(10, retries=0), "correction + loop": corrected(9, retries=1)}
outs = {name: r.build(denoiser).sample(N, seed=SEED + 1) for name, r in runs.items()}
for name, out in outs.items():
    scores = critic(out.images, torch.zeros(N, dtype=torch.long))
    flags = out.output(CriticOutput)  # None: no critic in the recipe
    flagged = flags.summary()["flagged_share"] if flags is not None else float("nan")
    print(f"{name:18s} mean NFE {out.nfe.float().mean():.2f}  critic logit {scores.mean():+.2f}  flagged {flagged:.2f}")
show(image_grid({name: to_unit(o.images[:10]) for name, o in outs.items()}, title="same noise, 10 calls each"))
