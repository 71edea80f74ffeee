"""Helpers for the notebooks: posterior summaries, sampler traces, uncertainty vs image structure.

Everything here is plain tensors in, plain tensors / dicts / matplotlib figures out, so the
notebooks under ``notebooks/`` stay thin and the logic is tested (``tests/test_analysis.py``).
Image tensors follow the library's convention: (N,C,H,W), samples in [-1, 1], variances
per pixel on the same scale.

Example:
    >>> from bdiff import load_model
    >>> from bdiff.analysis import posterior_summary, resolve_checkpoint
    >>> den = load_model(resolve_checkpoint(None))          # newest Bayesian run under runs/bdiff
    >>> [row["name"] for row in posterior_summary(den.model)]
    ['head.weight', 'head.bias']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bdiff.bayes.model import BayesianUNet, posterior_loc_scale
from bdiff.checkpoint import MODEL_PREFIX

__all__ = [
    "latest_checkpoint",
    "resolve_checkpoint",
    "posterior_summary",
    "posterior_snr",
    "ema_gap",
    "sobel_magnitude",
    "edge_uncertainty_correlation",
    "record_stack",
    "step_trace",
    "step_sizes",
    "side_by_side_extremes",
    "to_unit",
    "image_grid",
    "show",
    "reliability_figure",
]


# -- checkpoints --------------------------------------------------------------------------------
def _is_bayesian_checkpoint(path: Path) -> bool:
    """True when the checkpoint's ``bayes.layers`` is not ``none`` (reads the file)."""
    try:
        hp = torch.load(path, map_location="cpu", weights_only=True)["hyper_parameters"]
    except Exception:
        return False
    return hp.get("bayes", {}).get("layers", "head") not in ("none", [], None)


def latest_checkpoint(root: str | Path = "runs/bdiff", prefer_bayesian: bool = True) -> Path:
    """The newest ``<root>/*/checkpoints/last.ckpt`` (by modification time).

    Args:
        root: folder holding one sub-folder per run (``train.py`` writes ``runs/bdiff/<run id>``).
        prefer_bayesian: skip checkpoints trained with ``bayes.layers: none`` when a Bayesian one
            exists (the notebooks are about the weight posterior).

    Raises:
        FileNotFoundError: no ``last.ckpt`` under ``root`` (the message says how to make one).
    """
    paths = sorted(Path(root).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not paths:
        raise FileNotFoundError(
            f"no checkpoint matches {str(Path(root) / '*/checkpoints/last.ckpt')!r}: train one with "
            "`python train.py`, or set CKPT to a checkpoint path"
        )
    if prefer_bayesian:
        for path in paths:
            if _is_bayesian_checkpoint(path):
                return path
    return paths[0]


def resolve_checkpoint(ckpt: str | Path | None, root: str | Path = "runs/bdiff") -> Path:
    """``ckpt`` as a Path if given (must exist), else :func:`latest_checkpoint` under ``root``."""
    if ckpt is None:
        return latest_checkpoint(root)
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; set CKPT = None to use the newest run")
    return path


# -- weight posterior ----------------------------------------------------------------------------
@torch.no_grad()
def posterior_snr(model: BayesianUNet) -> dict[str, Tensor]:
    """{parameter_name: |mu| / sigma} of the mean-field posterior, each flattened to (numel,)."""
    return {
        name: (loc.abs() / scale.clamp_min(1e-30)).detach().flatten().cpu()
        for name, (loc, scale) in model.posterior_loc_scale().items()
    }


@torch.no_grad()
def posterior_summary(model: BayesianUNet) -> list[dict[str, Any]]:
    """One row per Bayesian parameter: how the posterior compares with the prior and the init.

    The deterministic init is the plain U-Net's value of the parameter (``model.net`` keeps the
    initial / warm-start means; the guide was initialised there).

    Returns:
        A list of dicts with ``name``, ``numel``, ``prior_std`` and ``posterior_std`` (means over
        the parameter's entries), ``std_ratio`` (posterior_std / prior_std), ``snr_median`` and
        ``snr_mean`` (|mu|/sigma), ``kl`` (closed-form KL(q||p) summed over the entries, nats),
        ``kl_per_weight``, ``shift`` (RMS of mu - init) and ``shift_in_prior_std``
        (shift / prior_std). Empty for a model with no Bayesian layers.
    """
    params = dict(model.net.named_parameters())
    snr = posterior_snr(model)
    rows: list[dict[str, Any]] = []
    for name, (loc, scale) in model.posterior_loc_scale().items():
        p_loc, p_scale = model.prior.prior(name)
        q, p = torch.distributions.Normal(loc, scale), torch.distributions.Normal(p_loc, p_scale)
        kl = float(torch.distributions.kl_divergence(q, p).sum())
        init = params[name].detach().to(loc.device) if name in params else torch.zeros_like(loc)
        shift = float((loc - init).pow(2).mean().sqrt())
        prior_std = float(p_scale.mean())
        rows.append(
            {
                "name": name,
                "numel": loc.numel(),
                "prior_std": prior_std,
                "posterior_std": float(scale.mean()),
                "std_ratio": float(scale.mean()) / prior_std,
                "snr_median": float(snr[name].median()),
                "snr_mean": float(snr[name].mean()),
                "kl": kl,
                "kl_per_weight": kl / loc.numel(),
                "shift": shift,
                "shift_in_prior_std": shift / prior_std,
            }
        )
    return rows


def ema_gap(ckpt: Mapping[str, Any], prefix: str = MODEL_PREFIX) -> dict[str, float] | None:
    """RMS gap between the EMA posterior means (``state_dict``) and the raw ones (``current_model_state``).

    Lightning's EMA callback keeps the raw training weights in ``current_model_state``; a small gap
    means training had settled. Returns ``{parameter_name: rms gap}`` or None when the checkpoint has
    no ``current_model_state`` (EMA off). ``prefix``: the BayesianUNet's key prefix in both dicts.
    """
    raw = ckpt.get("current_model_state")
    if not raw:
        return None
    ema, raw_post = posterior_loc_scale(ckpt["state_dict"], prefix), posterior_loc_scale(raw, prefix)
    return {
        name: float((loc - raw_post[name][0]).pow(2).mean().sqrt())
        for name, (loc, _) in ema.items()
        if name in raw_post
    }


# -- uncertainty vs image structure -------------------------------------------------------------
def sobel_magnitude(images: Tensor) -> Tensor:
    """Sobel gradient magnitude per pixel, channels averaged: (N,C,H,W) -> (N,H,W) (replicate padding)."""
    if images.dim() != 4:
        raise ValueError(f"images must be (N,C,H,W), got shape {tuple(images.shape)}")
    x = images.float().mean(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device)
    k = torch.stack([kx, kx.T])[:, None]  # (2,1,3,3)
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k)
    return g.pow(2).sum(1).sqrt()


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Pearson correlation of (N,D) tensors -> (N,); 0 where a row is constant."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    den = (a.pow(2).sum(1) * b.pow(2).sum(1)).sqrt()
    return torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-30), torch.zeros_like(den))


def edge_uncertainty_correlation(images: Tensor, variance: Tensor, edge_quantile: float = 0.75) -> dict[str, Any]:
    """Does the uncertainty sit on the edges of the finished image?

    Args:
        images: finished samples (N,C,H,W).
        variance: their per-pixel variance (N,C,H,W) (channels are averaged).
        edge_quantile: pixels whose Sobel magnitude is above this per-image quantile count as edges.

    Returns:
        ``per_sample``: Pearson correlation of std with Sobel magnitude per image (N,);
        ``pooled``: the same over all pixels of all images (float);
        ``edge_std`` / ``background_std``: mean std on edge / other pixels (floats);
        ``edge``: Sobel magnitude (N,H,W); ``std``: per-pixel std (N,H,W).
    """
    if images.shape != variance.shape:
        raise ValueError(f"images {tuple(images.shape)} and variance {tuple(variance.shape)} must have the same shape")
    edge = sobel_magnitude(images)
    std = variance.float().clamp_min(0).mean(1).sqrt()
    n = edge.shape[0]
    per_sample = _pearson(edge.reshape(n, -1), std.reshape(n, -1))
    pooled = float(_pearson(edge.reshape(1, -1), std.reshape(1, -1))[0])
    thresh = torch.quantile(edge.reshape(n, -1), edge_quantile, dim=1)[:, None, None]
    is_edge = edge > thresh
    background = ~is_edge
    return {
        "per_sample": per_sample,
        "pooled": pooled,
        "edge_std": float(std[is_edge].mean()) if is_edge.any() else float("nan"),
        "background_std": float(std[background].mean()) if background.any() else float("nan"),
        "edge": edge,
        "std": std,
    }


# -- sampler traces -------------------------------------------------------------------------------
def record_stack(records: Sequence[Mapping[str, Any]], key: str) -> Tensor:
    """Stack one recorded key over steps: records from ``Recorder`` -> (S, B, ...) (S records)."""
    if not records:
        raise ValueError("no records: add a Recorder callback to the sampler")
    if key not in records[0]:
        raise KeyError(f"records have no {key!r}; recorded keys are {sorted(records[0])}")
    return torch.stack([r[key] for r in records])


def step_trace(records: Sequence[Mapping[str, Any]]) -> Tensor:
    """Timestep per sample per recorded step, (S, B): row s holds the t step s started from.

    The Recorder runs after the update and before the step is committed, so its ``t`` is the
    timestep the prediction was made at; -1 marks a sample that had already finished.
    """
    return record_stack(records, "t").long()


def step_sizes(records: Sequence[Mapping[str, Any]]) -> list[Tensor]:
    """Per sample, the sizes of the steps it took (the last one ends at t = -1): B tensors (steps_b,).

    Needs a Recorder with ``every=1`` that kept every step (a finished sample's rows give size 0 and are dropped).
    """
    trace = step_trace(records)
    full = torch.cat([trace, torch.full_like(trace[:1], -1)])
    sizes = full[:-1] - full[1:]  # (S, B)
    return [col[col > 0] for col in sizes.T]


# -- ranking ---------------------------------------------------------------------------------------
def side_by_side_extremes(images: Tensor, variance: Tensor, k: int) -> dict[str, Tensor]:
    """The k least and k most uncertain samples of a batch (by mean per-pixel variance).

    Args:
        images: (N,C,H,W). variance: (N,C,H,W). k: how many of each (1 <= k <= N // 2).

    Returns:
        ``least`` / ``most``: indices (k,) (least: most confident first; most: most uncertain first),
        ``least_images`` / ``most_images`` (k,C,H,W), ``least_variance`` / ``most_variance`` (k,C,H,W),
        ``score``: mean variance per sample (N,).
    """
    if images.shape != variance.shape:
        raise ValueError(f"images {tuple(images.shape)} and variance {tuple(variance.shape)} must have the same shape")
    n = images.shape[0]
    if not 1 <= k <= n // 2:
        raise ValueError(f"k must be in [1, N // 2 = {n // 2}] so the two groups do not overlap, got {k}")
    score = variance.flatten(1).mean(1)
    order = score.argsort(stable=True)
    least, most = order[:k], order.flip(0)[:k]
    return {
        "least": least,
        "most": most,
        "least_images": images[least],
        "most_images": images[most],
        "least_variance": variance[least],
        "most_variance": variance[most],
        "score": score,
    }


# -- plotting ----------------------------------------------------------------------------------------
def to_unit(images: Tensor) -> Tensor:
    """Samples in [-1, 1] -> [0, 1] (clamped), same shape."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def image_grid(
    rows: Mapping[str, Tensor],
    col_titles: Sequence[str] | None = None,
    title: str | None = None,
    cmap: str | Mapping[str, str] = "gray",
    shared_scale: bool = False,
    size: float = 1.1,
):
    """A matplotlib figure with one row per entry of ``rows``, each (K,C,H,W) or (K,H,W).

    Args:
        rows: row label -> K images (channels averaged); every row must have the same K.
        col_titles: K column titles (e.g. the timestep).
        title: figure title.
        cmap: one colormap, or row label -> colormap (e.g. ``"magma"`` for variance rows).
        shared_scale: one colour scale per row (min..max over the row) instead of per image;
            use it for variance rows so brighter means more uncertain across the strip.
        size: inches per image.

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    import matplotlib.pyplot as plt

    ks = {len(v) for v in rows.values()}
    if len(ks) != 1:
        raise ValueError(f"every row needs the same number of images, got {sorted(ks)}")
    k = ks.pop()
    fig, axes = plt.subplots(len(rows), k, figsize=(size * k + 1.2, size * len(rows) + 0.6), squeeze=False)
    for r, (label, imgs) in enumerate(rows.items()):
        imgs = imgs.detach().float().cpu()
        imgs = imgs.mean(1) if imgs.dim() == 4 else imgs
        vmin, vmax = (float(imgs.min()), float(imgs.max())) if shared_scale else (None, None)
        row_cmap = cmap[label] if isinstance(cmap, Mapping) else cmap
        for c in range(k):
            ax = axes[r, c]
            ax.imshow(imgs[c].numpy(), cmap=row_cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
            if r == 0 and col_titles is not None:
                ax.set_title(str(col_titles[c]), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def show(fig) -> None:
    """Show a matplotlib figure inline in a notebook (any backend, Agg included), then close it.

    Outside IPython this falls back to ``plt.show()``.
    """
    import matplotlib.pyplot as plt

    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        shell = None
    if shell is not None:
        import io

        from IPython.display import Image, display

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        display(Image(data=buf.getvalue(), format="png"))  # PNG output whatever the backend
        plt.close(fig)
    else:
        plt.show()


def reliability_figure(curves_by_t: Mapping[int, Mapping[str, tuple[Tensor, Tensor, Tensor]]], title: str | None = None):
    """One log-log reliability panel per timestep: predicted variance vs observed squared error per bin.

    Args:
        curves_by_t: t -> (kind -> ``reliability_curve`` output (pred_var, observed, counts), each (bins,)),
            e.g. ``{t: reliability_at_t(den, x0, t) for t in (50, 250, 750)}``.
        title: figure title.

    Returns:
        The ``matplotlib.figure.Figure``; the dashed diagonal is perfect calibration, points
        above it are over-confident bins. Bins with a zero value cannot be drawn and are left out.
    """
    import matplotlib.pyplot as plt

    n = len(curves_by_t)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.4), squeeze=False)
    for ax, (t, curves) in zip(axes[0], curves_by_t.items()):
        lo, hi = float("inf"), float("-inf")
        for kind, (pred_var, observed, _counts) in curves.items():
            keep = (pred_var > 0) & (observed > 0)
            if not bool(keep.any()):
                continue
            x, y = pred_var[keep].numpy(), observed[keep].numpy()
            ax.plot(x, y, marker="o", markersize=3, label=kind)
            lo, hi = min(lo, x.min(), y.min()), max(hi, x.max(), y.max())
        if lo < hi:
            ax.plot([lo, hi], [lo, hi], "k--", linewidth=1, label="calibrated")
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_title(f"t = {t}")
        ax.set_xlabel("predicted variance (bin mean)")
        ax.set_ylabel("observed squared error (bin mean)")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def prior_scale_sweep(
    ckpt: str | Path, prior_scales: Sequence[float], steps: int, batch_size: int = 128, seed: int = 0
) -> list[dict[str, Any]]:
    """Effect of the prior scale: warm-start from ``ckpt`` and train the head posterior ``steps`` steps per scale.

    Each run uses the checkpoint's U-Net and Bayesian layers with ``bayes.prior_scale`` replaced,
    trains on the bundled digits with Lightning (no logger, no checkpoints), and reports the
    mean posterior std and closed-form KL per datum of every Bayesian parameter afterwards.
    Returns one row per (scale, parameter): ``prior_scale``, ``parameter``, ``posterior_std``,
    ``prior_std``, ``kl_per_datum``.
    """
    import lightning.pytorch as pl

    from bdiff.bayes import BayesConfig
    from bdiff.checkpoint import read_checkpoint
    from bdiff.lit.data import DigitsDataModule
    from bdiff.lit.module import DiffusionModule
    from bdiff.nets import UNetConfig

    hp = read_checkpoint(ckpt)["hyper_parameters"]
    rows: list[dict[str, Any]] = []
    for scale in prior_scales:
        pl.seed_everything(seed, verbose=False)
        bayes = BayesConfig(**{**hp["bayes"], "prior_scale": float(scale)})
        # a constant learning rate, and no validation (so no bottleneck GP to fit)
        module = DiffusionModule(net=UNetConfig(**hp["net"]), bayes=bayes, warm_start=str(ckpt), lr_warmup_steps=0,
                                 lr_decay="none", epistemic_gp=False)
        trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
        trainer.fit(module, DigitsDataModule(batch_size=batch_size, seed=seed))
        model = module.bayes
        for name, (loc, std) in model.posterior_loc_scale().items():
            prior_loc, prior_std = model.prior.prior(name)
            normal = torch.distributions.Normal
            kl = torch.distributions.kl_divergence(normal(loc, std), normal(prior_loc, prior_std)).sum()
            rows.append({"prior_scale": float(scale), "parameter": name, "posterior_std": float(std.mean()),
                         "prior_std": float(prior_std.mean()), "kl_per_datum": float(kl) / module.num_data})
    return rows
