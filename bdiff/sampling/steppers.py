"""Reverse-process steppers: one signature, one linear form, coefficients computed once per step.

Every stepper moves x_t to x_s (s < t; s = -1 is the clean image, a_s = 1) as

    x_s = a x_t + b (w_cur x0_hat(t) + sum_k w_k x0_hat(t_k)) + noise_std z

with per-sample coefficients and t_k the starts of the sample's last K steps (:class:`Memory`). The same
coefficients move the signed amplitude of the posterior perturbation (the propagated variance,
:mod:`bdiff.sampling.loop`), without the noise term. ``step(x, x0, ctx, memory, noise) -> (x_next, memory)``
is a pure function; ``x`` and ``x0`` are :class:`Tracked` pairs (value, amplitude).

* :class:`DDPM`: ancestral sampling from q(x_s | x_t, x0_hat) (Ho et al. 2020, eq. 7).
* :class:`DDIM`: Song et al. 2021, eq. 12, with ``eta``.
* :class:`DPMSolverPP2M`: DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), data prediction.
* :class:`UniPC`: UniPC (Zhao et al. 2023), predictor UniP-p and corrector UniC, order 2 or 3, bh1 or bh2.

Tests compare each with diffusers' schedulers step for step. Timestep grids are the schedule's
(:mod:`bdiff.schedule`) or fitted (:mod:`bdiff.sampling.fitted_grid`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
from torch import Tensor

from bdiff.checks import as_number
from bdiff.schedule import NoiseSchedule

_bcast = NoiseSchedule.broadcast
NoiseSampler = Callable[[Tensor], Tensor]
"""rows (B,) bool -> standard normal draws (B,C,H,W) for those rows, 0 elsewhere (k-diffusion's ``noise_sampler``)."""


class Tracked(NamedTuple):
    """An image batch ``value`` (B,C,H,W) and the signed amplitude ``amp`` (B,C,H,W) of its weight-posterior
    perturbation (variance = amp**2)."""

    value: Tensor
    amp: Tensor


class StepContext(NamedTuple):
    """Where one step goes: timesteps t, s (B,) long (s = -1: the clean image) and their alpha-bars a_t, a_s
    (B,) float64; ``a_after`` (B,) float64 is alpha-bar at the grid point after s (1 where that is the end)."""

    t: Tensor
    s: Tensor
    a_t: Tensor
    a_s: Tensor
    a_after: Tensor

    @classmethod
    def between(cls, schedule: NoiseSchedule, t: Tensor, s: Tensor, after: Tensor) -> StepContext:
        """The context of steps t -> s, with ``after`` the grid point after s; all (B,) long timesteps."""
        return cls(t, s, schedule.alpha_bar(t), schedule.alpha_bar(s), schedule.alpha_bar(after))


class StepCoefficients(NamedTuple):
    """One step's linear form (module docstring): a, b, w_cur, noise_std (B,) float64; w_hist (K,B) float64,
    the weights of the memory's K earlier x0 estimates, newest first."""

    a: Tensor
    b: Tensor
    w_cur: Tensor
    w_hist: Tensor
    noise_std: Tensor

    def apply(self, x: Tracked, x0: Tracked, memory: Memory, noise: NoiseSampler) -> Tracked:
        """x_s and its amplitude: the linear form on (x, x0, the memory's x0s); noise on the value only."""
        a, b, w_cur, sd = (_bcast(v, x.value) for v in (self.a, self.b, self.w_cur, self.noise_std))
        value = a * x.value + b * combine(w_cur * x0.value, self.w_hist, memory.x0)
        if bool((self.noise_std > 0).any()):
            value = value + sd * noise(self.noise_std > 0)
        return Tracked(value, a * x.amp + b * combine(w_cur * x0.amp, self.w_hist, memory.amp_x0))


def combine(current: Tensor, weights: Tensor, history: Tensor) -> Tensor:
    """``current`` (B,C,H,W) + sum_k weights[k] history[k]; weights (K,B), history (K,B,C,H,W)."""
    for w, h in zip(weights, history):
        current = current + _bcast(w, h) * h
    return current


@dataclass(frozen=True)
class Memory:
    """Each sample's last K steps, newest first: ``a`` (K,B) float64 their starts' alpha-bars (NaN where there
    is none: fewer steps so far, or just restarted); ``x0``, ``amp_x0`` (K,B,C,H,W) their x0 estimates and
    amplitudes (0 where ``a`` is NaN)."""

    a: Tensor
    x0: Tensor
    amp_x0: Tensor

    @classmethod
    def empty(cls, x: Tensor, depth: int) -> Memory:
        """No step yet for any row of ``x`` (B,C,H,W)."""
        nan = torch.full((depth, x.shape[0]), float("nan"), dtype=torch.float64, device=x.device)
        zeros = x.new_zeros((depth, *x.shape))
        return cls(nan, zeros, zeros)

    def where(self, rows: Tensor, other: Memory) -> Memory:
        """``other``'s entries for the samples in ``rows`` (B,) bool, this memory's for the rest."""
        stacked = {f.name for f in fields(Memory)}  # (K,B,...); a subclass's own fields are (B,...)

        def pick(name: str, mine: Tensor, theirs: Tensor) -> Tensor:
            shape = [1] * mine.dim()
            shape[1 if name in stacked else 0] = -1
            return torch.where(rows.reshape(shape), theirs, mine)

        return type(self)(**{f.name: pick(f.name, getattr(self, f.name), getattr(other, f.name)) for f in fields(self)})

    def pushed(self, a_t: Tensor, x0: Tracked) -> Memory:
        """This memory with the step from a_t (B,) and its x0 estimate first, the oldest dropped."""
        if self.a.shape[0] == 0:
            return self

        def push(new: Tensor, old: Tensor) -> Tensor:
            return torch.cat([new.unsqueeze(0), old[:-1]])

        return replace(self, a=push(a_t, self.a), x0=push(x0.value, self.x0), amp_x0=push(x0.amp, self.amp_x0))

    def edited(self, pixels: Tensor) -> Memory:
        """This memory after a sampler callback replaced the ``pixels`` (B,C,H,W) bool of the step's output."""
        return self


class Stepper:
    """A step's linear form from :meth:`coefficients`; :meth:`step` applies it (a pure function)."""

    name = "stepper"
    depth = 0
    """K, how many earlier steps the memory holds."""
    memory_type: type[Memory] = Memory

    def coefficients(self, ctx: StepContext, a_hist: Tensor) -> StepCoefficients:
        """The step's coefficients; ``a_hist`` (K,B) float64 is the memory's ``a``."""
        raise NotImplementedError

    def memory(self, x: Tensor) -> Memory:
        """An empty memory for the batch ``x`` (B,C,H,W)."""
        return self.memory_type.empty(x, self.depth)

    def step(self, x: Tracked, x0: Tracked, ctx: StepContext, memory: Memory, noise: NoiseSampler
             ) -> tuple[Tracked, Memory]:
        """x_t -> x_s and the memory once the step is taken."""
        self._check(memory)
        return self.coefficients(ctx, memory.a).apply(x, x0, memory, noise), memory.pushed(ctx.a_t, x0)

    def _check(self, memory: Memory) -> None:
        if type(memory) is not self.memory_type or memory.a.shape[0] != self.depth:
            raise ValueError(f"{self.name} keeps {self.depth} earlier steps in a {self.memory_type.__name__} but got a "
                             f"{type(memory).__name__} of {memory.a.shape[0]}: start from this stepper's memory(x)")


def _first_order(a: Tensor, b: Tensor, a_hist: Tensor, noise_std: Tensor | None = None) -> StepCoefficients:
    zeros = torch.zeros_like(a)
    return StepCoefficients(a, b, torch.ones_like(a), a_hist.new_zeros(a_hist.shape),
                            zeros if noise_std is None else noise_std)


class DDPM(Stepper):
    """Ancestral sampling from the posterior q(x_s | x_t, x0_hat) with the "fixed_small" variance."""

    name = "ddpm"

    def coefficients(self, ctx: StepContext, a_hist: Tensor) -> StepCoefficients:
        a_t, a_s = ctx.a_t, ctx.a_s
        beta = 1 - a_t / a_s
        var = ((1 - a_s) / (1 - a_t) * beta).clamp(min=1e-20)
        noise_std = torch.where(a_s < 1, var.sqrt(), torch.zeros_like(var))
        return _first_order((a_t / a_s).sqrt() * (1 - a_s) / (1 - a_t), a_s.sqrt() * beta / (1 - a_t), a_hist, noise_std)


class DDIM(Stepper):
    """DDIM with stochasticity ``eta`` (0: deterministic; 1: DDPM's posterior)."""

    name = "ddim"

    def __init__(self, eta: float = 0.0) -> None:
        self.eta = as_number("DDIM eta", eta, 0)

    def coefficients(self, ctx: StepContext, a_hist: Tensor) -> StepCoefficients:
        a_t, a_s = ctx.a_t, ctx.a_s
        sigma = self.eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).clamp(min=0).sqrt()
        a = (1 - a_s - sigma**2).clamp(min=0).sqrt() / (1 - a_t).sqrt()  # eps_hat's coefficient over sigma_t
        return _first_order(a, a_s.sqrt() - a * a_t.sqrt(), a_hist, sigma)


class Exponential(NamedTuple):
    """The exponential-integrator terms of a step in lambda = log(alpha/sigma) (DPM-Solver++, UniPC), (B,) or
    (K,B) float64: a = sigma_s/sigma_t, b = alpha_s (1 - e^{-h}), h = lambda_s - lambda_t (inf on the final
    step), r = (lambda_k - lambda_t) / h for the memory's steps (K,B), NaN where there is none."""

    a: Tensor
    b: Tensor
    h: Tensor
    r: Tensor

    @classmethod
    def of(cls, a_t: Tensor, a_s: Tensor, a_hist: Tensor) -> Exponential:
        def lam(a: Tensor) -> Tensor:
            return 0.5 * (torch.log(a) - torch.log1p(-a))  # +inf at a = 1

        h = lam(a_s) - lam(a_t)
        a = ((1 - a_s) / (1 - a_t)).sqrt()
        return cls(a, a_s.sqrt() * -torch.expm1(-h), h, (lam(a_hist) - lam(a_t)) / h)


class DPMSolverPP2M(Stepper):
    """DPM-Solver++(2M): x_s = (sigma_s/sigma_t) x_t + alpha_s (1 - e^{-h}) ((1 - w) x0_t + w x0_prev), w = 1/(2 r).

    First order on a sample's first step and on the final step to sigma = 0 (h is infinite there), as
    diffusers does with ``final_sigmas_type="zero"``.
    """

    name = "dpmpp_2m"
    depth = 1

    def coefficients(self, ctx: StepContext, a_hist: Tensor) -> StepCoefficients:
        e = Exponential.of(ctx.a_t, ctx.a_s, a_hist)
        second = torch.isfinite(e.h) & torch.isfinite(e.r[0])
        w = torch.where(second, 0.5 / e.r[0], torch.zeros_like(e.h))
        return StepCoefficients(e.a, e.b, 1 - w, w.unsqueeze(0), torch.zeros_like(e.a))
