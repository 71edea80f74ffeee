"""Is the denoiser's predicted variance calibrated? Held-out checks at a grid of timesteps.

At timestep t we draw noise, form x_t ~ q(x_t | x_0) (Ho et al. 2020, eq. 4), and compare the
squared error of the noise prediction, err2 = (noise - eps_hat)^2 per pixel, with the predicted
variance ``var`` of one kind: epistemic (spread over weight samples), aleatoric (the variance
head) or total (their sum, law of total variance; Kendall & Gal 2017). A calibrated ``var`` is
the expected ``err2``:

* ``z2``: mean squared standardised error, mean(err2 / var); ideal 1 (> 1: over-confident).
* ``nll``: Gaussian negative log-likelihood per pixel, mean(0.5 (log 2 pi + log var + err2/var))
  (a proper scoring rule; Lakshminarayanan et al. 2017).
* ``mean_var``: mean predicted variance, to compare with ``mse`` = mean(err2).
* reliability curve: pixels binned by predicted variance (equal-count quantile bins), mean
  predicted variance against observed mean err2 per bin; calibrated = on the diagonal
  (Levi et al. 2019, "Evaluating and calibrating uncertainty prediction in regression tasks").

A variance kind that is zero on some pixel (e.g. epistemic for a deterministic network) has no
z2 or NLL: those entries are ``None``, never ``inf``. Noise comes from a seeded
``torch.Generator`` (default seed 0), so the numbers are reproducible; a Bayesian denoiser's
weight samples use the global RNG (``torch.manual_seed`` it for bit-identical repeats).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bdiff.checks import as_integer
from bdiff.denoiser import Denoiser, Prediction

VARIANCE_KINDS = ("epistemic", "aleatoric", "total")
ReliabilityCurve = tuple[Tensor, Tensor, Tensor]
"""(mean predicted variance per bin, observed mean squared error per bin, pixels per bin), each (bins,)."""


def _variance(pred: Prediction, kind: str) -> Tensor:
    """The named variance of a prediction, (B,C,H,W)."""
    if kind == "epistemic":
        return pred.var_epistemic
    if kind == "aleatoric":
        return pred.var_aleatoric
    if kind == "total":
        return pred.var_total
    raise ValueError(f"unknown variance kind {kind!r}; known: {', '.join(VARIANCE_KINDS)}")


def _check_x0(x0: Tensor) -> None:
    if x0.dim() != 4 or not x0.is_floating_point() or x0.shape[0] == 0:
        raise ValueError(f"x0 must be a non-empty float batch (N, C, H, W), got shape {tuple(x0.shape)}, {x0.dtype}")
    lo, hi = float(x0.min()), float(x0.max())
    if not (lo >= -1.001 and hi <= 1.001):
        raise ValueError(f"x0 must be in [-1, 1] (the model's scale), got values in [{lo:.3g}, {hi:.3g}]")


def noised_errors(
    denoiser: Denoiser,
    x0: Tensor,
    t: int,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> tuple[Tensor, Prediction]:
    """Squared noise-prediction error and the prediction at one timestep.

    Draws noise (N,C,H,W) from ``generator`` (on its device; default CPU seed 0), forms
    x_t = ``denoiser.schedule.q_sample(x0, t, noise)`` and calls ``denoiser.predict`` under
    ``torch.no_grad()``, in chunks of ``batch_size`` images (the noise is drawn for all images
    first, so results do not depend on ``batch_size``).

    Returns:
        err2 = (noise - eps)^2, (N,C,H,W), and the concatenated :class:`Prediction`.
    """
    _check_x0(x0)
    shape = getattr(denoiser, "image_shape", None)
    if shape is not None and tuple(x0.shape[1:]) != tuple(shape):
        raise ValueError(
            f"x0 has images of shape {tuple(x0.shape[1:])} but the denoiser models {tuple(shape)} (C, H, W)"
        )
    T = denoiser.schedule.timesteps
    as_integer("timestep", t, 0, T - 1)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
    n = x0.shape[0]
    step = n if batch_size is None else batch_size
    if step < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    parts: list[Prediction] = []
    with torch.no_grad():
        for i in range(0, n, step):
            x0_i, noise_i = x0[i : i + step], noise[i : i + step]
            t_i = torch.full((x0_i.shape[0],), t, dtype=torch.long, device=x0.device)
            pred = denoiser.predict(denoiser.schedule.q_sample(x0_i, t_i, noise_i), t_i)
            for name, value in zip(pred._fields, pred):
                if value.shape != x0_i.shape:
                    raise ValueError(
                        f"denoiser.predict returned {name} of shape {tuple(value.shape)}, expected {tuple(x0_i.shape)}"
                    )
            parts.append(pred)
    pred = Prediction(*(torch.cat(field) for field in zip(*parts)))
    return (noise - pred.eps) ** 2, pred


def calibration_stats(err2: Tensor, var: Tensor, kind: str) -> dict[str, float | None]:
    """``z2_<kind>``, ``nll_<kind>``, ``mean_var_<kind>`` of one variance kind; err2, var same shape.

    z2 and nll are None where any pixel's variance is 0 (they would be infinite).
    Raises ValueError for negative or non-finite variances (a bug upstream, not a number to report).
    """
    if not torch.isfinite(var).all() or bool((var < 0).any()):
        raise ValueError(f"{kind} variance has negative or non-finite values: the denoiser's prediction is broken")
    e, v = err2.double(), var.double()
    out: dict[str, float | None] = {f"z2_{kind}": None, f"nll_{kind}": None, f"mean_var_{kind}": float(v.mean())}
    if bool((v > 0).all()):
        z2 = e / v
        out[f"z2_{kind}"] = float(z2.mean())
        out[f"nll_{kind}"] = float((0.5 * (math.log(2 * math.pi) + v.log() + z2)).mean())
    return out


def calibration_at_t(
    denoiser: Denoiser,
    x0: Tensor,
    timesteps: Sequence[int],
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> list[dict[str, Any]]:
    """Calibration of each predicted variance kind on held-out images at each timestep.

    Args:
        denoiser: any :class:`~bdiff.denoiser.Denoiser` (put it in eval mode first).
        x0: held-out images (N,C,H,W) in [-1, 1].
        timesteps: integer timesteps in [0, T-1].
        generator: noise generator (default ``torch.Generator().manual_seed(0)``); draws once per t, in order.
        batch_size: images per ``predict`` call (default: all at once).

    Returns:
        One dict per timestep: ``t``, ``num_pixels``, ``mse``, and for each kind in
        (epistemic, aleatoric, total) ``z2_<kind>`` (ideal 1), ``nll_<kind>`` (per pixel, nats)
        and ``mean_var_<kind>``; z2/nll are None for a kind that is zero on some pixel.

    Example:
        >>> rows = calibration_at_t(load_model(ckpt), x0_val, [50, 250, 500, 900])
        >>> [round(r["z2_total"], 2) for r in rows]
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    rows: list[dict[str, Any]] = []
    for t in timesteps:
        err2, pred = noised_errors(denoiser, x0, t, generator, batch_size)
        row: dict[str, Any] = {"t": int(t), "num_pixels": err2.numel(), "mse": float(err2.double().mean())}
        for kind in VARIANCE_KINDS:
            row.update(calibration_stats(err2, _variance(pred, kind), kind))
        rows.append(row)
    return rows


def reliability_curve(err2: Tensor, var: Tensor, bins: int = 15) -> ReliabilityCurve:
    """Bin pixels by predicted variance into ``bins`` equal-count (quantile) bins.

    Args:
        err2: squared errors, any shape.
        var: predicted variances, same shape as ``err2``, >= 0.
        bins: number of bins (at most the number of pixels).

    Returns:
        (pred_var, observed_mse, counts), each (bins,): mean predicted variance, mean squared
        error and pixel count per bin, in increasing predicted variance (float64, float64, int64).
        Calibrated: observed_mse == pred_var.
    """
    if err2.shape != var.shape:
        raise ValueError(f"err2 and var must have the same shape, got {tuple(err2.shape)} and {tuple(var.shape)}")
    n = var.numel()
    as_integer("bins (at most the number of pixels)", bins, 1, n)
    if not torch.isfinite(var).all() or bool((var < 0).any()) or not torch.isfinite(err2).all():
        raise ValueError("var must be finite and >= 0, and err2 finite")
    v, e = var.detach().flatten().double().cpu(), err2.detach().flatten().double().cpu()
    bin_id = torch.empty(n, dtype=torch.long)
    bin_id[torch.argsort(v, stable=True)] = torch.arange(n) * bins // n  # rank -> quantile bin
    counts = torch.bincount(bin_id, minlength=bins)
    pred_var = torch.bincount(bin_id, weights=v, minlength=bins) / counts
    observed = torch.bincount(bin_id, weights=e, minlength=bins) / counts
    return pred_var, observed, counts


def reliability_at_t(
    denoiser: Denoiser,
    x0: Tensor,
    t: int,
    generator: torch.Generator | None = None,
    bins: int = 15,
    kinds: Sequence[str] = ("aleatoric", "total"),
) -> dict[str, ReliabilityCurve]:
    """Reliability curves of the given variance kinds at timestep t, ready for :func:`plot_reliability`."""
    err2, pred = noised_errors(denoiser, x0, t, generator)
    return {kind: reliability_curve(err2, _variance(pred, kind), bins) for kind in kinds}


def plot_reliability(curves: Mapping[str, ReliabilityCurve], path: str | Path, title: str | None = None) -> Path:
    """Write a log-log reliability diagram (PNG): predicted variance vs observed MSE per bin.

    The dashed diagonal is perfect calibration; points above it are over-confident bins.
    Bins with a zero predicted variance or error cannot be drawn on log axes and are left
    out (a curve with nothing left is skipped with a warning).

    Args:
        curves: label -> :func:`reliability_curve` output.
        path: output PNG; parent folders are created.
        title: figure title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lo, hi = math.inf, -math.inf
    for label, (pred_var, observed, _counts) in curves.items():
        keep = (pred_var > 0) & (observed > 0)
        if not bool(keep.any()):
            warnings.warn(f"reliability curve {label!r} has no bin with positive variance and error; not drawn")
            continue
        x, y = pred_var[keep].numpy(), observed[keep].numpy()
        ax.plot(x, y, marker="o", markersize=3, label=label)
        lo, hi = min(lo, x.min(), y.min()), max(hi, x.max(), y.max())
    if lo > hi:
        raise ValueError("no reliability curve has a bin with positive predicted variance and error: nothing to plot")
    ax.plot([lo, hi], [lo, hi], "k--", linewidth=1, label="calibrated")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted variance (bin mean)")
    ax.set_ylabel("observed squared error (bin mean)")
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
