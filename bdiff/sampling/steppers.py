"""Reverse-process steppers in one linear form, so one sampler loop serves them all.

Every stepper moves x_t to x_s (s < t; s = -1 means the final image, a_s = 1) as

    x_s = a * x_t + b * D + noise_std * z,      D = w_cur * x0_hat(t) + w_prev * x0_hat(t_prev)

with per-sample coefficients. Writing them this way lets the sampler propagate
variance generically (:mod:`bdiff.sampling.sampler`) and lets tests compare
each stepper with diffusers' ``step`` on identical inputs.

* DDPM ancestral (Ho et al. 2020, eq. 7; posterior q(x_s | x_t, x0) for any s < t).
* DDIM (Song et al. 2021, eq. 12), with ``eta``.
* DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2), data prediction,
  second-order multistep with a first-order first step and (optionally) last step.
* UniPC (Zhao et al. 2023), order 2, bh2 or bh1: DPM-Solver++(2M) (rescaled for bh1) as
  predictor plus a corrector, also linear in (x_t, x0 estimates), applied by its ``step`` to
  x_t before the predictor.

A step is one pure function, :meth:`Stepper.step`, of typed inputs and a frozen multistep
:class:`Memory` (UniPC's :class:`CorrectorMemory` adds its corrector's fields).

Timestep grids (trailing, Karras) are the schedule's: :mod:`bdiff.schedule`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor

from bdiff.checks import as_number
from bdiff.schedule import NoiseSchedule


class StepCoefficients(NamedTuple):
    """Per-sample coefficients of one step, each (B,) float64 (see module docstring)."""

    a: Tensor
    b: Tensor
    w_cur: Tensor
    w_prev: Tensor
    noise_std: Tensor


@dataclass(frozen=True)
class Memory:
    """A multistep stepper's memory of each sample's previous accepted step.

    a: that step's a_t (B,) float64, NaN where there is none (a first step, or just restarted);
    x0, amp_x0: its x0 estimate and the estimate's signed amplitude (B,C,H,W), 0 where ``a`` is NaN.
    """

    a: Tensor
    x0: Tensor
    amp_x0: Tensor

    @classmethod
    def empty(cls, x: Tensor) -> Memory:
        """No previous step for any row of ``x`` (B,C,H,W): NaN alpha-bars (and ``x_pred``), zero images."""
        nan = torch.full((x.shape[0],), float("nan"), dtype=torch.float64, device=x.device)
        blank = {"a": nan, "a2": nan, "x_pred": torch.full_like(x, float("nan"))}
        return cls(**{f.name: blank.get(f.name, torch.zeros_like(x)) for f in fields(cls)})

    def where(self, rows: Tensor, other: Memory) -> Memory:
        """``other``'s entries for the samples in ``rows`` (B,) bool, this memory's for the rest."""
        def pick(mine: Tensor, theirs: Tensor) -> Tensor:
            return torch.where(NoiseSchedule.broadcast(rows, mine), theirs, mine)

        return type(self)(**{f.name: pick(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)})


@dataclass(frozen=True)
class CorrectorMemory(Memory):
    """UniPC's memory: :class:`Memory`, the step before it (``a2``, ``x0_2``, ``amp_x0_2``) for the
    corrector's second order, and the predictor's output ``x_pred`` (B,C,H,W), NaN where none: only
    pixels still equal to it (no callback rewrote them: refinement, pinning) are corrected."""

    a2: Tensor
    x0_2: Tensor
    amp_x0_2: Tensor
    x_pred: Tensor


class StepOut(NamedTuple):
    """One step's result: x at s and its amplitude (B,C,H,W), and the memory once the step is taken."""

    x_next: Tensor
    amp_next: Tensor
    memory: Memory


NoiseSampler = Callable[[Tensor], Tensor]  # rows (B,) bool -> standard normal draws (B,C,H,W), 0 elsewhere


class Stepper:
    """Base class: ``coefficients(a_t, a_s, a_prev)`` gives a step's linear form (all (B,) float64);
    :meth:`step` applies it.

    ``a_prev`` is a_{t_prev} of the previous step's start (B,), NaN where none
    (first step of a sample); single-step methods ignore it.
    """

    name: str = "base"

    def coefficients(self, a_t: Tensor, a_s: Tensor, a_prev: Tensor) -> StepCoefficients:
        raise NotImplementedError

    def memory(self, x: Tensor) -> Memory:
        """An empty memory for the batch ``x`` (B,C,H,W)."""
        return Memory.empty(x)

    def step(
        self, x: Tensor, amp: Tensor, x0: Tensor, amp_x0: Tensor, a_t: Tensor, a_s: Tensor, memory: Memory,
        noise: NoiseSampler,
    ) -> StepOut:
        """x_t -> x_s by the linear form of the module docstring, the amplitude alongside (a pure function).

        x, amp, x0, amp_x0: (B,C,H,W), x_t and the x0 estimate with their signed amplitudes;
        a_t, a_s: (B,) float64 alpha-bars of the step's ends; ``noise(rows)`` draws z for the rows
        whose step is stochastic (as k-diffusion's ``noise_sampler``).
        """
        c = self.coefficients(a_t, a_s, memory.a)
        a, b, w_cur, w_prev, sd = (NoiseSchedule.broadcast(v, x) for v in c)
        x_next = a * x + b * (w_cur * x0 + w_prev * memory.x0)
        if bool((c.noise_std > 0).any()):
            x_next = x_next + sd * noise(c.noise_std > 0)
        amp_next = a * amp + b * (w_cur * amp_x0 + w_prev * memory.amp_x0)
        return StepOut(x_next, amp_next, Memory(a_t, x0, amp_x0))


class DDPM(Stepper):
    """Ancestral sampling from the posterior q(x_s | x_t, x0_hat) with the "fixed_small" variance."""

    name = "ddpm"

    def coefficients(self, a_t: Tensor, a_s: Tensor, a_prev: Tensor) -> StepCoefficients:
        alpha = a_t / a_s
        beta = 1 - alpha
        b = a_s.sqrt() * beta / (1 - a_t)
        a = alpha.sqrt() * (1 - a_s) / (1 - a_t)
        var = ((1 - a_s) / (1 - a_t) * beta).clamp(min=1e-20)
        zero = torch.zeros_like(a)
        return StepCoefficients(a, b, torch.ones_like(a), zero, torch.where(a_s < 1, var.sqrt(), zero))


class DDIM(Stepper):
    """DDIM with stochasticity ``eta`` (eta=0 deterministic, eta=1 equals DDPM's posterior)."""

    name = "ddim"

    def __init__(self, eta: float = 0.0) -> None:
        self.eta = as_number("DDIM eta", eta, 0)

    def coefficients(self, a_t: Tensor, a_s: Tensor, a_prev: Tensor) -> StepCoefficients:
        sigma = self.eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).clamp(min=0).sqrt()
        dir_coef = (1 - a_s - sigma**2).clamp(min=0).sqrt()  # coefficient of eps_hat
        a = dir_coef / (1 - a_t).sqrt()
        b = a_s.sqrt() - a * a_t.sqrt()
        return StepCoefficients(a, b, torch.ones_like(a), torch.zeros_like(a), sigma)


class DPMSolverPP2M(Stepper):
    """DPM-Solver++(2M): x_s = (sig_s/sig_t) x_t + alpha_s (1 - e^{-h}) D, D = (1 + 1/2r) x0_t - (1/2r) x0_prev.

    h = lambda_s - lambda_t, lambda = log(alpha/sigma); r = h_prev / h. First order on a
    sample's first step and on the final step to sigma = 0 (h is infinite there), as
    diffusers does with ``final_sigmas_type="zero"``.
    """

    name = "dpmpp_2m"

    @staticmethod
    def _sigma_over_alpha(a: Tensor) -> Tensor:
        return ((1 - a) / a).sqrt()  # e^{-lambda}

    def coefficients(self, a_t: Tensor, a_s: Tensor, a_prev: Tensor) -> StepCoefficients:
        rho_t, rho_s = self._sigma_over_alpha(a_t), self._sigma_over_alpha(a_s)
        a = ((1 - a_s) / (1 - a_t)).sqrt()  # sigma_s / sigma_t
        exp_neg_h = rho_s / rho_t  # e^{-h}; 0 at the final step (sigma_s = 0)
        b = a_s.sqrt() * (1 - exp_neg_h)
        h = torch.log(rho_t) - torch.log(rho_s)
        h_prev = torch.log(self._sigma_over_alpha(a_prev)) - torch.log(rho_t)
        second = torch.isfinite(h_prev) & torch.isfinite(h)
        half_over_r = torch.where(second, 0.5 * h / h_prev * self._second_order_gain(h), torch.zeros_like(h))
        half_over_r = torch.nan_to_num(half_over_r, nan=0.0, posinf=0.0, neginf=0.0)
        zero = torch.zeros_like(a)
        return StepCoefficients(a, b, 1 + half_over_r, -half_over_r, zero)

    def _second_order_gain(self, h: Tensor) -> Tensor:
        """Factor on the second-order term, relative to DPM-Solver++(2M)'s (which is 1). (B,) float64."""
        return torch.ones_like(h)


class UniPC(DPMSolverPP2M):
    """UniPC (Zhao et al. 2023, "UniPC"), order 2, data prediction, B(h) = e^h - 1 ("bh2") or h ("bh1").

    With bh2 the predictor UniP-2 is DPM-Solver++(2M) itself (same coefficients); bh1 scales its
    second-order term by h / (1 - e^{-h}) (UniPC's B(h) = h in place of e^h - 1; the paper
    recommends bh1 for unconditional sampling with few steps). The corrector UniC
    reuses the model output m_s that the next step evaluates anyway at the predicted x_s, so it
    costs no extra denoiser call: with t the previous step's start and p the one before,

        x_s <- x_s - alpha_s B(h) [ (rho_0 - 1/2) D1 + rho_1 (m_s - m_t) ],   D1 = (m_p - m_t) / r,
        h = lambda_s - lambda_t,  r = (lambda_p - lambda_t) / h,

    with (rho_0, rho_1) solving UniPC's order-2 system (paper eq. 8 / Alg. 2); after a
    first-order step (no p) the correction is - alpha_s B(h) (m_s - m_t) / 2. m_s stays the
    model output of the uncorrected x_s, as in the paper and diffusers'
    ``UniPCMultistepScheduler`` (matched in the tests). The final step, to sigma = 0, is first
    order (the x0 estimate itself), so B(h) never enters it; diffusers' bh1 with
    ``final_sigmas_type="zero"`` multiplies its zero second-order term by B(h) = -inf there and
    returns NaN, so its bh1 is only usable with ``final_sigmas_type="sigma_min"``.

    Args:
        variant: ``"bh2"`` (default) or ``"bh1"``.
    """

    name = "unipc"
    VARIANTS = ("bh1", "bh2")

    def __init__(self, variant: str = "bh2") -> None:
        if variant not in self.VARIANTS:
            raise ValueError(f"UniPC variant must be one of {self.VARIANTS} (its B(h)), got {variant!r}")
        self.variant = variant

    def _b(self, h: Tensor) -> Tensor:
        """B(-h) of UniPC's data-prediction form: e^{-h} - 1 (bh2) or -h (bh1). (B,) float64."""
        return torch.expm1(-h) if self.variant == "bh2" else -h

    def _second_order_gain(self, h: Tensor) -> Tensor:
        gain = self._b(h) / torch.expm1(-h)  # 1 for bh2; h / (1 - e^{-h}) for bh1
        return torch.where(torch.isfinite(gain), gain, torch.ones_like(h))

    def memory(self, x: Tensor) -> CorrectorMemory:
        return CorrectorMemory.empty(x)

    def step(
        self, x: Tensor, amp: Tensor, x0: Tensor, amp_x0: Tensor, a_t: Tensor, a_s: Tensor, memory: Memory,
        noise: NoiseSampler,
    ) -> StepOut:
        """Correct x_t with the model output just evaluated there (UniC), then predict x_s (UniP-2)."""
        if not isinstance(memory, CorrectorMemory):
            raise TypeError(f"UniPC steps with its CorrectorMemory (UniPC().memory(x)), got {type(memory).__name__}")
        x, amp = self.correct(x, amp, x0, amp_x0, a_t, memory)
        out = super().step(x, amp, x0, amp_x0, a_t, a_s, memory, noise)
        m = out.memory
        x_pred = out.x_next.clone()  # callbacks edit x_next in place
        return out._replace(memory=CorrectorMemory(m.a, m.x0, m.amp_x0, memory.a, memory.x0, memory.amp_x0, x_pred))

    def correct(
        self, x: Tensor, amp: Tensor, x0: Tensor, amp_x0: Tensor, a_t: Tensor, memory: CorrectorMemory
    ) -> tuple[Tensor, Tensor]:
        """x_t and its amplitude after UniC: x += c_t m_t + c_1 m_prev + c_2 m_prev2, amplitudes alike.

        m_t = ``x0`` is the model output at the uncorrected x_t (as in UniPC); only pixels the
        previous predictor step produced are moved (none on a first step or after a restart).
        """
        c_now, c_1, c_2 = self.corrector(a_t, memory.a, memory.a2)
        mask = (x == memory.x_pred) & NoiseSchedule.broadcast(torch.isfinite(c_now) & torch.isfinite(c_1), x)
        c_now, c_1, c_2 = (NoiseSchedule.broadcast(torch.nan_to_num(c), x) for c in (c_now, c_1, c_2))
        x_c = torch.where(mask, x + c_now * x0 + c_1 * memory.x0 + c_2 * memory.x0_2, x)
        amp_c = torch.where(mask, amp + c_now * amp_x0 + c_1 * memory.amp_x0 + c_2 * memory.amp_x0_2, amp)
        return x_c, amp_c

    def corrector(self, a_s: Tensor, a_t: Tensor, a_p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Weights (c_s, c_t, c_p), each (B,) float64: x_s += c_s m_s + c_t m_t + c_p m_p.

        a_s: a at the point just evaluated; a_t: the previous step's start; a_p: the step
        before that, NaN where the previous step was first-order (then c_p = 0).
        """
        def lam(a: Tensor) -> Tensor:  # log(alpha / sigma)
            return -torch.log(self._sigma_over_alpha(a))

        h = lam(a_s) - lam(a_t)
        B = self._b(h)
        scale = a_s.sqrt() * B  # alpha_s B(h)
        phi_1 = torch.expm1(-h) / -h - 1
        b1 = phi_1 / B
        b2 = 2 * (phi_1 / -h - 0.5) / B
        r = (lam(a_p) - lam(a_t)) / h
        second = torch.isfinite(r)
        r = torch.where(second, r, torch.full_like(r, -1.0))  # placeholder where unused
        rho_0 = (b1 - b2) / (1 - r)
        rho_1 = b1 - rho_0
        c_s = torch.where(second, -scale * rho_1, -0.5 * scale)
        c_p = torch.where(second, -scale * (rho_0 - 0.5) / r, torch.zeros_like(h))
        return c_s, -c_s - c_p, c_p


STEPPERS: dict[str, type[Stepper]] = {"ddpm": DDPM, "ddim": DDIM, "dpmpp_2m": DPMSolverPP2M, "unipc": UniPC}
