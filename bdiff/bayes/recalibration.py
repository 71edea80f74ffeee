"""Per-timestep recalibration of the aleatoric variance, fitted on held-out images.

The variance head is trained by NLL against the *raw* weights' errors, but samples and
uncertainty maps come from the EMA weights, whose errors are smaller (on the digits 3x
smaller at t = 750). The head is also a single conv on features trained for eps, so the
t-profile of its variance is only as good as those features allow. Measured on the default
model, held-out total-variance z^2 = E[err^2 / var] swings from 0.3 to 1.2 over t.

The fix is the regression analogue of temperature scaling (Levi et al. 2019, "Evaluating and
Calibrating Uncertainty Prediction in Regression Tasks"; Kuleshov et al. 2018): a scale s(t)
on the aleatoric variance, chosen per timestep knot so that held-out z^2 of the *total*
variance is exactly 1,

    E[ err^2 / (s(t) var_aleatoric + var_epistemic) ] = 1,

and interpolated linearly in log s between knots. Epistemic variance is left as it is (its
scale is the posterior's business, not a nuisance to fit away), with one exception: where the
epistemic variance *alone* exceeds the error (z^2 < 1 even with the aleatoric scale at its
floor; the bottleneck GP's prior does this at t ~ 950 on the default digits model), no aleatoric
scale can calibrate the total, and both variances take one common scale c(t) instead,

    E[ err^2 / (c(t) (var_aleatoric + var_epistemic)) ] = 1,

which keeps the epistemic variance's ranking of images at that t and its share of the total as
predicted. No library fits this: it is a 1-D root find per knot (the left side decreases in s),
done by bisection in log s.

Fitting happens on validation images during training (:class:`bdiff.lit.module.DiffusionModule`,
with the EMA weights in place) and is stored in the checkpoint; ``load_model`` restores it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from bdiff.denoiser import Prediction
from bdiff.schedule import NoiseSchedule

LOG_SCALE_BOUND = 20.0  # |log s| <= 20: wider than any sensible correction, finite for empty data
FINAL_DRAWS = 4  # noise draws per image and knot for the calibration a checkpoint ships with


def default_knots(timesteps: int, num_knots: int = 32) -> list[int]:
    """Knots t_k = round((T-1) (k/(K-1))^2): dense at low t, where the error changes fastest."""
    if num_knots < 2:
        raise ValueError(f"num_knots must be >= 2, got {num_knots}")
    ts = sorted({round((timesteps - 1) * (k / (num_knots - 1)) ** 2) for k in range(num_knots)})
    return ts


@dataclass(frozen=True)
class VarianceCalibration:
    """Scale of the aleatoric (and, where needed, epistemic) variance per timestep knot; linear in log scale between knots.

    Attributes:
        knots: increasing integer timesteps (K,).
        log_scale: log s at each knot (K,), for the aleatoric variance; 0 everywhere is the identity.
        log_epistemic_scale: log c at each knot (K,) for the epistemic variance (module docstring), or
            None: left as it is everywhere (calibrations of earlier versions, and other uses of the class).
    """

    knots: tuple[int, ...]
    log_scale: tuple[float, ...]
    log_epistemic_scale: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.knots) != len(self.log_scale) or len(self.knots) < 2:
            raise ValueError("VarianceCalibration needs >= 2 knots and one log_scale per knot")
        if self.log_epistemic_scale is not None and len(self.log_epistemic_scale) != len(self.knots):
            raise ValueError("VarianceCalibration needs one log_epistemic_scale per knot (or None)")
        if any(b <= a for a, b in zip(self.knots, self.knots[1:])):
            raise ValueError(f"VarianceCalibration knots must increase, got {self.knots}")

    def scale(self, t: Tensor) -> Tensor:
        """s(t) for integer t (B,) -> (B,), float32; constant beyond the end knots."""
        return self._interpolate(self.log_scale, t)

    def epistemic_scale(self, t: Tensor) -> Tensor:
        """c(t) for integer t (B,) -> (B,), float32 (ones without ``log_epistemic_scale``)."""
        if self.log_epistemic_scale is None:
            return torch.ones(t.shape, dtype=torch.float32, device=t.device)
        return self._interpolate(self.log_epistemic_scale, t)

    def _interpolate(self, log_values: tuple[float, ...], t: Tensor) -> Tensor:
        knots = torch.tensor(self.knots, dtype=torch.float32, device=t.device)
        logs = torch.tensor(log_values, dtype=torch.float32, device=t.device)
        tf = t.float().clamp(knots[0], knots[-1])
        # torch has no 1-D interp; index of the left knot, then the usual lerp.
        i = (torch.searchsorted(knots, tf, right=True) - 1).clamp(0, len(self.knots) - 2)
        w = (tf - knots[i]) / (knots[i + 1] - knots[i])
        return torch.exp(torch.lerp(logs[i], logs[i + 1], w))

    def apply(self, pred: Prediction, t: Tensor) -> Prediction:
        """The prediction with var_aleatoric (B,C,H,W) multiplied by s(t) (B,) and var_epistemic by c(t)."""
        shape = (-1, *([1] * (pred.var_aleatoric.dim() - 1)))
        s = self.scale(t).to(pred.var_aleatoric.dtype).reshape(shape)
        var_epistemic = pred.var_epistemic
        if self.log_epistemic_scale is not None:
            var_epistemic = var_epistemic * self.epistemic_scale(t).to(var_epistemic.dtype).reshape(shape)
        return Prediction(pred.eps, var_epistemic, pred.var_aleatoric * s)

    def to_dict(self) -> dict[str, list]:
        """Plain lists, for a checkpoint (loads under ``torch.load(weights_only=True)``)."""
        out = {"knots": list(self.knots), "log_scale": list(self.log_scale)}
        if self.log_epistemic_scale is not None:
            out["log_epistemic_scale"] = list(self.log_epistemic_scale)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, list]) -> VarianceCalibration:
        epistemic = d.get("log_epistemic_scale")
        return cls(tuple(int(k) for k in d["knots"]), tuple(float(v) for v in d["log_scale"]),
                   None if epistemic is None else tuple(float(v) for v in epistemic))


@dataclass
class KnotErrors:
    """Squared errors and the two predicted variances at one knot, flattened pixels (P,) each."""

    err2: Tensor
    var_aleatoric: Tensor
    var_epistemic: Tensor


def knot_errors(
    predict: Callable[[Tensor, Tensor], Prediction],
    schedule: NoiseSchedule,
    x0: Tensor,
    knots: list[int],
    generator: torch.Generator,
    max_pixels: int | None = None,
    draws: int = 1,
) -> list[KnotErrors]:
    """Noise the images x0 (N,C,H,W) in [-1,1] at each knot and record the predictor's errors.

    ``predict(x_t, t)`` must be the *uncalibrated* prediction (e.g.
    ``BayesianDenoiser.predict_uncalibrated``), or a calibration would be fitted on top of
    itself. ``max_pixels`` keeps a strided subset of pixels per knot (memory for large
    images); None keeps all N*C*H*W. Each image is noised ``draws`` times per knot (the
    mean of err^2/var is heavy-tailed at small t: more draws, steadier fit). Noise is drawn
    from ``generator`` in knot order.
    """
    x0 = x0.repeat(draws, *([1] * (x0.dim() - 1)))
    out = []
    for t_int in knots:
        t = torch.full((x0.shape[0],), t_int, dtype=torch.long, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        with torch.no_grad():
            pred = predict(schedule.q_sample(x0, t, noise), t)
        fields = ((noise - pred.eps) ** 2, pred.var_aleatoric, pred.var_epistemic)
        flat = [f.detach().flatten().float().cpu() for f in fields]
        if max_pixels is not None and flat[0].numel() > max_pixels:
            stride = -(-flat[0].numel() // max_pixels)
            flat = [f[::stride] for f in flat]
        out.append(KnotErrors(*flat))
    return out


def merge_knot_errors(parts: list[list[KnotErrors]]) -> list[KnotErrors]:
    """Concatenate per-batch :func:`knot_errors` results knot by knot."""
    return [
        KnotErrors(*(torch.cat([getattr(p[k], f) for p in parts]) for f in ("err2", "var_aleatoric", "var_epistemic")))
        for k in range(len(parts[0]))
    ]


def _bisect_log(z2_at: Callable[[float], float], iterations: int) -> float:
    """The log scale in [-20, 20] where the decreasing function z2_at(log scale) crosses 1, by bisection."""
    lo, hi = -LOG_SCALE_BOUND, LOG_SCALE_BOUND
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if z2_at(mid) > 1 else (lo, mid)
    return 0.5 * (lo + hi)


def solve_log_scale(e: KnotErrors, iterations: int = 60) -> float:
    """log s with mean(err^2 / (s var_a + var_e)) = 1, by bisection on [-20, 20] (monotone in s)."""
    err2, va, ve = e.err2.double(), e.var_aleatoric.double().clamp_min(1e-30), e.var_epistemic.double()
    if err2.numel() == 0:
        return 0.0
    return _bisect_log(lambda m: float((err2 / (math.exp(m) * va + ve).clamp_min(1e-300)).mean()), iterations)


def solve_log_scales(e: KnotErrors, iterations: int = 60) -> tuple[float, float]:
    """(log s, log c) at one knot: the aleatoric scale with the epistemic variance as it is (log c = 0), or,
    where the epistemic variance alone gives z^2 < 1, one common scale of both (module docstring)."""
    err2, va, ve = e.err2.double(), e.var_aleatoric.double().clamp_min(1e-30), e.var_epistemic.double()
    if err2.numel() == 0 or float((err2 / ve.clamp_min(1e-300)).mean()) >= 1:
        return solve_log_scale(e, iterations), 0.0
    common = _bisect_log(lambda m: float((err2 / (math.exp(m) * (va + ve)).clamp_min(1e-300)).mean()), iterations)
    return common, common


def fit_calibration(knots: list[int], errors: list[KnotErrors]) -> VarianceCalibration:
    """The :class:`VarianceCalibration` that makes total z^2 = 1 at every knot on ``errors``."""
    if len(knots) != len(errors):
        raise ValueError(f"{len(knots)} knots but errors for {len(errors)}")
    scales = [solve_log_scales(e) for e in errors]
    epistemic = tuple(c for _, c in scales)
    return VarianceCalibration(tuple(int(k) for k in knots), tuple(s for s, _ in scales),
                               epistemic if any(c != 0.0 for c in epistemic) else None)
