"""Distance-aware epistemic variance: a Gaussian process per noise level on the U-Net's bottleneck.

Why the bottleneck (BENCHMARKS.md, "Held-out digit class"): trained without one digit class,
every posterior over the head is blind, because the network's *final* features of an unseen
digit sit among those of seen digits (feature collapse; van Amersfoort et al. 2020 "DUQ",
Liu et al. 2020 "SNGP", Mukhoti et al. 2021 "DDU"). The bottleneck still tells them apart.

Why one GP per noise level (docs/bottleneck_gp.md, "Why one GP per noise level"): the bottleneck
activation ``h = UNet.encode(x_t, t)[0]`` moves with t far more than with the image, so a GP
fitted on activations at random t compares an image at t = 100 mostly with activations of other
noise levels. A GP fitted on the training images
noised at that t alone doubles the held-out/seen variance ratio at t = 50-100.

The design, after SNGP's distance-aware output layer:

- **Knots** t_1 < ... < t_K, uniform in log-SNR log(abar/(1-abar)) over t = 1 ... T-2, plus 0
  and T-1. At each knot, the training images noised at t_k (``draws`` noisings each) give the
  GP's inputs.
- **Features**: the flattened activation, standardised per column, projected on its top
  ``dims`` principal axes at that knot (``torch.pca_lowrank``, Halko et al. 2011) and divided by
  the RBF lengthscale: ``lengthscale`` x the median distance between the projected training
  activations (the median heuristic). A low-dimensional view keeps the nearest training
  activations near: 16 axes read a 1.6x higher held-out/seen ratio than all 1,024 (class 3).
- **Posterior variance**, RBF kernel k(z, z') = exp(-|z - z'|^2 / 2), noise variance ``noise``
  in units of the prior variance 1, conditioned on the query's ``neighbours`` nearest training
  activations only (a nearest-neighbour GP: Vecchia 1988, Datta et al. 2016 "NNGP"):

      v(z) = 1 - k_n(z)^T (K_nn + noise I)^{-1} k_n(z)        in [0, 1]

  ~noise / n near n training activations, -> 1 (the prior) far from all of them. With a
  lengthscale this short the other activations' kernel values are ~0, so this is the exact
  GP's variance at O(neighbours^3) per query instead of O(N^2); it is not fitted to any target,
  so fitting is one pass of the trunk over the training images per knot (seconds on a CPU).
- **Between knots**, v is interpolated linearly in log-SNR from the two bracketing knots' GPs.

In eps units: the GP's prior variance at t is the network's mean aleatoric variance at t over
training images, s(t) (how much of eps the network cannot predict at that noise level; linear
in log s between 16 knots), so an image's epistemic variance is at most what the network
already admits to, and is v(h) s(t) on average per pixel. At high t the head's variance exceeds
the network's actual error, and v ~ 0.3 for seen images there, so the GP's variance alone can
exceed the error (t ~ 950 on the digits): the per-t recalibration then scales both variances
(:mod:`bdiff.bayes.recalibration`). (The network's own mean squared eps error as s(t) ranks
samples worse, AUROC 0.66-0.78 against 0.71-0.86: docs/bottleneck_gp.md, "The prior's scale and the
calibration".) It is spread over the pixels like the image's own aleatoric variance:

    var_epistemic[p] = v(h) * s(t) * sigma^2[p] / mean_p sigma^2[p].

Settings (knots 20, dims 16, neighbours 16, lengthscale 0.5, noise 0.01, draws 3): the highest
held-out/seen variance ratio on held-out class 3 whose variance costs at most 0.2 of a forward
(benchmarks/gp_variants.py --nearest); classes 5 and 8 are the report.

Written by hand (a few lines of linear algebra): Pyro's ``contrib.gp`` models recompute their
training-side factors at every call and have no nearest-neighbour conditioning, and no
maintained torch library ships SNGP's layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bdiff.bayes.head import head_at, require_point_trunk
from bdiff.bayes.model import BayesianUNet
from bdiff.bayes.recalibration import VarianceCalibration, default_knots
from bdiff.schedule import NoiseSchedule

SIGNAL_KNOTS = 16  # timestep knots of the prior variance s(t)
SIGNAL_IMAGES = 256  # training images that set s(t)
MEDIAN_ROWS = 2000  # training activations the median heuristic looks at
FORM = "per_t_nearest_neighbour"  # what to_dict stores, so a checkpoint of another form is recognised


def log_snr(schedule: NoiseSchedule) -> Tensor:
    """(T,) log(abar_t / (1 - abar_t)) of the schedule, float64 on the CPU."""
    abar = schedule.alphas_cumprod.detach().double().cpu()
    return (abar / (1 - abar)).log()


def log_snr_knots(log_snr_table: Tensor, num_knots: int) -> list[int]:
    """Timesteps (ascending, distinct) whose log-SNR is nearest to ``num_knots`` levels uniform in log-SNR.

    The levels span the log-SNR of t = 1 ... T-2: the end points can be outliers (the cosine
    schedule's last step is -19.8 against -11.5 one step earlier), which would crowd the knots
    there. The first and last timesteps are knots too, so every t in [0, T-1] lies between two, and
    nearest-timestep rounding can merge levels: the count can differ from ``num_knots`` by a few.
    """
    levels = torch.linspace(float(log_snr_table[-2]), float(log_snr_table[1]), num_knots, dtype=torch.float64)
    nearest = {int((log_snr_table - level).abs().argmin()) for level in levels}
    return sorted(nearest | {0, len(log_snr_table) - 1})


@dataclass(eq=False)
class BottleneckGP:
    """Fitted nearest-neighbour GPs over bottleneck activations, one per t-knot (build it with :meth:`fit`).

    Attributes:
        knots: (K,) ascending timesteps of the knots.
        log_snr: (T,) log-SNR of every timestep (for interpolating between knots).
        center: (K, d) per-knot mean of the flattened bottleneck activations.
        projection: (K, d, r) per knot: divide by the column std, project on the top r principal
            axes, divide by the lengthscale. Features z = (h - center) @ projection.
        points: (K, N, r) the training activations' features at each knot.
        signal: s(t), the GP's prior variance per t (as knots of log values).
        noise: the GP's noise variance relative to its prior variance.
        neighbours: how many nearest training activations each query is conditioned on.
    """

    knots: Tensor
    log_snr: Tensor
    center: Tensor
    projection: Tensor
    points: Tensor
    signal: VarianceCalibration
    noise: float
    neighbours: int

    @classmethod
    @torch.no_grad()
    def fit(
        cls,
        model: BayesianUNet,
        schedule: NoiseSchedule,
        images: Iterable[Tensor],
        knots: int = 20,
        dims: int = 16,
        neighbours: int = 16,
        lengthscale: float = 0.5,
        noise: float = 0.01,
        draws: int = 3,
        seed: int = 0,
    ) -> BottleneckGP:
        """Fit on training images: at each knot t_k, ``draws`` noisings of every image at t_k.

        Uses its own generator (``seed``), never torch's global random state, so training with the
        GP fitted at every validation draws the same numbers as training without it.

        Args:
            model: a trained U-Net whose only Bayesian layers are the head (used at its posterior mean).
            schedule: the model's noise schedule (its log-SNR places the knots).
            images: batches x0 (B,C,H,W) in [-1,1] on the model's device.
            knots: K, the number of log-SNR levels (at least 2).
            dims: r, principal axes kept per knot.
            neighbours: nearest training activations each query is conditioned on.
            lengthscale: the RBF lengthscale as a multiple of the median distance between the
                projected training activations at that knot (the median heuristic).
            noise: the GP's noise variance relative to its prior variance.
            draws: noisings of each image at each knot (N = draws x images training activations per knot).
            seed: seed of the noisings, the principal axes' random sketch and the median heuristic's rows.
        """
        require_point_trunk(model, "the bottleneck GP")
        if knots < 2 or dims < 1 or neighbours < 1 or lengthscale <= 0 or noise <= 0 or draws < 1:
            raise ValueError(
                "the bottleneck GP needs knots >= 2, dims >= 1, neighbours >= 1, lengthscale > 0, noise > 0 and "
                f"draws >= 1, got {knots}, {dims}, {neighbours}, {lengthscale}, {noise}, {draws}"
            )
        batches = list(images)
        if not batches:
            raise ValueError("the bottleneck GP needs at least one batch of training images")
        g = torch.Generator().manual_seed(seed)
        table = log_snr(schedule)
        knot_ts = log_snr_knots(table, knots)
        centers, projections, points = [], [], []
        for k in knot_ts:
            acts = []
            for x0 in batches:
                t = torch.full((x0.shape[0],), k, dtype=torch.long, device=x0.device)
                for _ in range(draws):
                    x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=g).to(x0.device))
                    acts.append(model.net.encode(x_t, t)[0].flatten(1).double().cpu())
            center, projection, z = _principal_features(torch.cat(acts), dims, lengthscale, g)
            centers.append(center)
            projections.append(projection)
            points.append(z)
        signal = _mean_aleatoric(model, schedule, torch.cat(batches)[:SIGNAL_IMAGES], g)
        return cls(torch.tensor(knot_ts), table.float(), torch.stack(centers).float(), torch.stack(projections).float(),
                   torch.stack(points).float(), signal, float(noise), int(neighbours))

    def gp_variance(self, h: Tensor, t: Tensor) -> Tensor:
        """(B, d) flattened bottleneck activations at integer t (B,) -> v(h) (B,), in units of the GP's prior variance."""
        t = t.to(h.device).long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= len(self.log_snr)):
            raise ValueError(f"the bottleneck GP takes timesteps in [0, {len(self.log_snr) - 1}], got "
                             f"{int(t.min())}...{int(t.max())}")
        self._to(h.device)
        with torch.autocast(h.device.type, enabled=False):  # distances and the Cholesky factor need fp32
            return self._variance(h.float(), t)

    def _variance(self, h: Tensor, t: Tensor) -> Tensor:
        """gp_variance for fp32 h (B, d) and valid t (B,) on the GP's device."""
        hi = torch.searchsorted(self.knots, t).clamp(max=len(self.knots) - 1)  # first knot >= t
        lo = torch.where(self.knots[hi] > t, hi - 1, hi)
        span = self.log_snr[self.knots[hi]] - self.log_snr[self.knots[lo]]
        w_hi = torch.where(hi == lo, torch.zeros_like(span), (self.log_snr[t] - self.log_snr[self.knots[lo]]) / span)
        # (image, knot, weight) pairs: each image's two bracketing knots (one when t is a knot)
        image = torch.arange(len(t), device=h.device).repeat(2)
        knot, weight = torch.cat([lo, hi]), torch.cat([1 - w_hi, w_hi]).float()
        keep = weight > 0
        image, knot, weight = image[keep], knot[keep], weight[keep]
        v = self._pair_variance(h, image, knot)
        return torch.zeros(len(t), device=h.device).index_add_(0, image, weight * v)

    def _pair_variance(self, h: Tensor, image: Tensor, knot: Tensor) -> Tensor:
        """v (P,) of h[image[p]] under knot knot[p]'s GP, conditioned on its nearest training activations.

        h: (B, d) fp32; image, knot: (P,) indices into the batch and the knots.
        """
        num_points = self.points.shape[1]
        m = min(self.neighbours, num_points)
        d2 = torch.empty(len(image), m, device=h.device)
        flat_idx = torch.empty(len(image), m, dtype=torch.long, device=h.device)
        for k in torch.unique(knot).tolist():  # projection and distances: one matmul per knot
            rows = (knot == k).nonzero().squeeze(1)
            z = (h[image[rows]] - self.center[k]) @ self.projection[k]  # (b, r)
            # squared distances as |z|^2 + |p|^2 - 2 z.p: one matmul, no square roots
            dist = torch.addmm(z.pow(2).sum(1, keepdim=True) + self._squared_norms[k], z, self.points[k].T, alpha=-2)
            d2[rows], idx = dist.clamp_min(0).topk(m, dim=1, largest=False)
            flat_idx[rows] = idx + k * num_points
        near = self.points.flatten(0, 1)[flat_idx]  # (P, m, r)
        near_sq = self._squared_norms.flatten()[flat_idx]  # (P, m)
        pair = (near_sq[:, :, None] + near_sq[:, None, :] - 2 * near @ near.transpose(1, 2)).clamp_min(0)
        gram = torch.exp(-pair / 2) + self.noise * torch.eye(m, device=h.device)
        chol, info = torch.linalg.cholesky_ex(gram)  # positive definite by construction (noise > 0)
        if info.any():
            raise RuntimeError("the bottleneck GP's neighbour Gram matrix is not positive definite: refit it with a "
                               "larger noise (BottleneckGP.fit(..., noise=...))")
        s = torch.linalg.solve_triangular(chol, torch.exp(-d2 / 2)[..., None], upper=False)
        return (1 - s.squeeze(-1).pow(2).sum(1)).clamp(0, 1)

    def epistemic(self, h: Tensor, t: Tensor, aleatoric: Tensor) -> Tensor:
        """Epistemic variance of eps (B,C,H,W) from the bottleneck h (B,C',H',W'), t (B,) and the aleatoric map (B,C,H,W)."""
        v = (self.gp_variance(h.flatten(1), t) * self.signal.scale(t).to(h.device)).to(aleatoric.dtype)
        shape = aleatoric / aleatoric.mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        return v[:, None, None, None] * shape

    def _to(self, device: torch.device) -> None:
        if self.points.device != device:
            for name in ("knots", "log_snr", "center", "projection", "points"):
                setattr(self, name, getattr(self, name).to(device))
            self._squared_norms = self.points.pow(2).sum(-1)

    def __post_init__(self) -> None:
        self._squared_norms = self.points.pow(2).sum(-1)  # (K, N)

    def to_dict(self) -> dict[str, Any]:
        """Tensors and plain values (loads with ``torch.load(weights_only=True)``)."""
        return {"form": FORM, "knots": self.knots.cpu(), "log_snr": self.log_snr.cpu(),
                "center": self.center.cpu(), "projection": self.projection.cpu(), "points": self.points.cpu(),
                "signal": self.signal.to_dict(), "noise": self.noise, "neighbours": self.neighbours}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BottleneckGP:
        if d.get("form") != FORM:
            raise ValueError(
                f"this checkpoint's bottleneck GP has the form {d.get('form', 'random features (earlier bdiff versions)')!r}, "
                f"which this version does not read (it reads {FORM!r}): refit it on the training images with "
                "BottleneckGP.fit(den.model, den.schedule, images) (seconds)"
            )
        return cls(d["knots"], d["log_snr"], d["center"], d["projection"], d["points"],
                   VarianceCalibration.from_dict(d["signal"]), float(d["noise"]), int(d["neighbours"]))


def restore(stored: dict[str, Any]) -> BottleneckGP | None:
    """The GP a checkpoint stores, or None (with a warning) for the random-feature form of earlier versions."""
    if stored.get("form") == FORM:
        return BottleneckGP.from_dict(stored)
    found = stored.get("form", "random features (earlier bdiff versions)")
    warnings.warn(f"this checkpoint's bottleneck GP has the form {found!r}, which this version does not read; it is "
                  "left out (epistemic variance from the head only). Refit it on the training images with "
                  "BottleneckGP.fit(den.model, den.schedule, images)", stacklevel=3)
    return None


def _principal_features(acts: Tensor, dims: int, lengthscale: float, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """acts (N, d) float64 -> center (d,), projection (d, r) and the projected training features (N, r)."""
    center, scale = acts.mean(0), acts.std(0).clamp_min(1e-6)
    z = (acts - center) / scale
    r = min(dims, *z.shape)
    with torch.random.fork_rng(devices=[]):  # pca_lowrank draws its sketch from the global CPU generator (acts is on
        # the CPU); seed only that one, which fork_rng restores (torch.manual_seed would also reseed every GPU's)
        torch.default_generator.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        _, _, axes = torch.pca_lowrank(z, q=r, center=False, niter=4)
    projection = axes[:, :r] / scale[:, None]
    feats = (acts - center) @ projection
    pick = torch.randperm(len(feats), generator=g)[:MEDIAN_ROWS]
    ell = lengthscale * float(torch.cdist(feats[pick], feats[pick]).median().clamp_min(1e-6))
    return center, projection / ell, feats / ell


def _mean_aleatoric(model: BayesianUNet, schedule: NoiseSchedule, x0: Tensor, g: torch.Generator) -> VarianceCalibration:
    """s(t): the mean aleatoric variance of eps over images x0 at the head's posterior mean, at 16 knots."""
    weights = {name: loc for name, (loc, _) in model.posterior_loc_scale().items()}
    knots, logs = default_knots(schedule.timesteps, SIGNAL_KNOTS), []
    for k in knots:
        t = torch.full((len(x0),), k, dtype=torch.long, device=x0.device)
        x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=g).to(x0.device))
        log_var = head_at(model.net, weights, model.net.features(x_t, t))[1]
        logs.append(float(log_var.exp().mean().log()))
    return VarianceCalibration(tuple(knots), tuple(logs))
