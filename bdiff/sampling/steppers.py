"""Reverse-process steppers in one linear form, so one sampler loop serves them all.

Every stepper moves x_t to x_s (s < t; s = -1 means the final image, a_s = 1) as

    x_s = a * x_t + b * D + noise_std * z,      D = w_cur * x0_hat(t) + sum_k w_k * x0_hat(t_k)

with per-sample coefficients, t_k the starts of the sample's last K steps (K = 0 for single-step
methods, 1 for DPM-Solver++(2M), the order for UniPC). Writing them this way lets the sampler propagate
variance generically (:mod:`bdiff.sampling.sampler`) and lets tests compare
each stepper with diffusers' ``step`` on identical inputs.

* DDPM ancestral (Ho et al. 2020, eq. 7; posterior q(x_s | x_t, x0) for any s < t).
* DDIM (Song et al. 2021, eq. 12), with ``eta``.
* DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2), data prediction,
  second-order multistep with a first-order first step and (optionally) last step.
* UniPC (Zhao et al. 2023), order 2 or 3, bh2 or bh1: a multistep predictor (at order 2,
  DPM-Solver++(2M), rescaled for bh1) plus a corrector, also linear in (x_t, x0 estimates),
  applied by its ``step`` to x_t before the predictor.

A step is one pure function, :meth:`Stepper.step`, of typed inputs and a frozen multistep
:class:`Memory` of the last K steps (UniPC's :class:`CorrectorMemory` adds the predictor's output).

Timestep grids (trailing, Karras) are the schedule's: :mod:`bdiff.schedule`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
from torch import Tensor

from bdiff.checks import as_number
from bdiff.schedule import NoiseSchedule


class StepCoefficients(NamedTuple):
    """Per-sample coefficients of one step (see module docstring): a, b, w_cur, noise_std (B,) float64;
    w_hist (K,B) float64, the weights of the memory's K earlier x0 estimates (newest first)."""

    a: Tensor
    b: Tensor
    w_cur: Tensor
    w_hist: Tensor
    noise_std: Tensor


@dataclass(frozen=True)
class Memory:
    """A multistep stepper's memory of each sample's last K accepted steps, newest first (K = ``Stepper.depth``).

    a: those steps' a_t (K,B) float64, NaN where there is none (fewer steps so far, or just restarted);
    x0, amp_x0: their x0 estimates and the estimates' signed amplitudes (K,B,C,H,W), 0 where ``a`` is NaN.
    """

    a: Tensor
    x0: Tensor
    amp_x0: Tensor

    @classmethod
    def empty(cls, x: Tensor, depth: int) -> Memory:
        """A memory of ``depth`` steps with no step yet for any row of ``x`` (B,C,H,W): NaN alpha-bars, zero images."""
        nan = torch.full((depth, x.shape[0]), float("nan"), dtype=torch.float64, device=x.device)
        zeros = x.new_zeros((depth, *x.shape))
        return cls(nan, zeros, zeros)

    @property
    def depth(self) -> int:
        """K, the number of earlier steps held."""
        return self.a.shape[0]

    def where(self, rows: Tensor, other: Memory) -> Memory:
        """``other``'s entries for the samples in ``rows`` (B,) bool, this memory's for the rest."""
        history = {f.name for f in fields(Memory)}  # stacked (K,B,...); a subclass's own fields are (B,...)

        def pick(name: str, mine: Tensor, theirs: Tensor) -> Tensor:
            batch_dim = 1 if name in history else 0
            shape = [1] * mine.dim()
            shape[batch_dim] = -1
            return torch.where(rows.reshape(shape), theirs, mine)

        return type(self)(**{f.name: pick(f.name, getattr(self, f.name), getattr(other, f.name)) for f in fields(self)})

    def pushed(self, a_t: Tensor, x0: Tensor, amp_x0: Tensor) -> Memory:
        """This memory with the step just taken (a_t (B,), x0 and amp_x0 (B,C,H,W)) first and the oldest dropped."""
        if self.depth == 0:
            return self

        def push(new: Tensor, old: Tensor) -> Tensor:
            return torch.cat([new.unsqueeze(0), old[:-1]])

        return replace(self, a=push(a_t, self.a), x0=push(x0, self.x0), amp_x0=push(amp_x0, self.amp_x0))


@dataclass(frozen=True)
class CorrectorMemory(Memory):
    """UniPC's memory: :class:`Memory`, the predictor's output ``x_pred`` (B,C,H,W), NaN where none (only
    pixels still equal to it, which no callback rewrote (refinement, pinning), are corrected), and that
    predictor step's ``order`` (B,) long, 0 where none: its corrector solves the system of the same order."""

    x_pred: Tensor
    order: Tensor

    @classmethod
    def empty(cls, x: Tensor, depth: int) -> CorrectorMemory:
        """No step yet: :meth:`Memory.empty`, ``x_pred`` NaN and ``order`` 0 for every row of ``x`` (B,C,H,W)."""
        blank = Memory.empty(x, depth)
        order = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return cls(blank.a, blank.x0, blank.amp_x0, torch.full_like(x, float("nan")), order)


class StepOut(NamedTuple):
    """One step's result: x at s and its amplitude (B,C,H,W), and the memory once the step is taken."""

    x_next: Tensor
    amp_next: Tensor
    memory: Memory


NoiseSampler = Callable[[Tensor], Tensor]  # rows (B,) bool -> standard normal draws (B,C,H,W), 0 elsewhere


class Stepper:
    """Base class: ``coefficients(a_t, a_s, a_hist)`` gives a step's linear form (a_t, a_s (B,) float64);
    :meth:`step` applies it.

    ``a_hist`` (K,B) float64 holds a_t of the sample's last K steps' starts, newest first, NaN where none
    (:class:`Memory`); single-step methods (``depth`` 0) get K = 0. ``a_after`` (B,) float64, or None where
    unknown, is a at the grid point after s (1 where the step after this one is the final one); only
    UniPC's ``lower_order_final`` reads it.
    """

    name: str = "base"
    depth: int = 0
    """How many earlier steps the memory holds (:class:`Memory`)."""

    def coefficients(self, a_t: Tensor, a_s: Tensor, a_hist: Tensor, a_after: Tensor | None = None) -> StepCoefficients:
        raise NotImplementedError

    def memory(self, x: Tensor) -> Memory:
        """An empty memory for the batch ``x`` (B,C,H,W)."""
        return Memory.empty(x, self.depth)

    def step(
        self, x: Tensor, amp: Tensor, x0: Tensor, amp_x0: Tensor, a_t: Tensor, a_s: Tensor, memory: Memory,
        noise: NoiseSampler, a_after: Tensor | None = None,
    ) -> StepOut:
        """x_t -> x_s by the linear form of the module docstring, the amplitude alongside (a pure function).

        x, amp, x0, amp_x0: (B,C,H,W), x_t and the x0 estimate with their signed amplitudes;
        a_t, a_s: (B,) float64 alpha-bars of the step's ends; ``noise(rows)`` draws z for the rows
        whose step is stochastic (as k-diffusion's ``noise_sampler``); ``a_after``: see the class docstring.
        """
        if memory.depth != self.depth:
            raise ValueError(f"{self.name} keeps {self.depth} earlier steps but got a memory of {memory.depth}: "
                             "start from this stepper's own memory(x)")
        c = self.coefficients(a_t, a_s, memory.a, a_after)
        a, b, w_cur, sd = (NoiseSchedule.broadcast(v, x) for v in (c.a, c.b, c.w_cur, c.noise_std))
        x_next = a * x + b * self._combine(w_cur * x0, c.w_hist, memory.x0)
        if bool((c.noise_std > 0).any()):
            x_next = x_next + sd * noise(c.noise_std > 0)
        amp_next = a * amp + b * self._combine(w_cur * amp_x0, c.w_hist, memory.amp_x0)
        return StepOut(x_next, amp_next, memory.pushed(a_t, x0, amp_x0))

    @staticmethod
    def _combine(current: Tensor, weights: Tensor, history: Tensor) -> Tensor:
        """``current`` (B,C,H,W) + sum_k weights[k] * history[k]; weights (K,B), history (K,B,C,H,W)."""
        for w, h in zip(weights, history):
            current = current + NoiseSchedule.broadcast(w, h) * h
        return current


class DDPM(Stepper):
    """Ancestral sampling from the posterior q(x_s | x_t, x0_hat) with the "fixed_small" variance."""

    name = "ddpm"

    def coefficients(self, a_t: Tensor, a_s: Tensor, a_hist: Tensor, a_after: Tensor | None = None) -> StepCoefficients:
        alpha = a_t / a_s
        beta = 1 - alpha
        b = a_s.sqrt() * beta / (1 - a_t)
        a = alpha.sqrt() * (1 - a_s) / (1 - a_t)
        var = ((1 - a_s) / (1 - a_t) * beta).clamp(min=1e-20)
        zero = torch.zeros_like(a)
        noise_std = torch.where(a_s < 1, var.sqrt(), zero)
        return StepCoefficients(a, b, torch.ones_like(a), a_hist.new_zeros(a_hist.shape), noise_std)


class DDIM(Stepper):
    """DDIM with stochasticity ``eta`` (eta=0 deterministic, eta=1 equals DDPM's posterior)."""

    name = "ddim"

    def __init__(self, eta: float = 0.0) -> None:
        self.eta = as_number("DDIM eta", eta, 0)

    def coefficients(self, a_t: Tensor, a_s: Tensor, a_hist: Tensor, a_after: Tensor | None = None) -> StepCoefficients:
        sigma = self.eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).clamp(min=0).sqrt()
        dir_coef = (1 - a_s - sigma**2).clamp(min=0).sqrt()  # coefficient of eps_hat
        a = dir_coef / (1 - a_t).sqrt()
        b = a_s.sqrt() - a * a_t.sqrt()
        return StepCoefficients(a, b, torch.ones_like(a), a_hist.new_zeros(a_hist.shape), sigma)


class DPMSolverPP2M(Stepper):
    """DPM-Solver++(2M): x_s = (sig_s/sig_t) x_t + alpha_s (1 - e^{-h}) D, D = (1 + 1/2r) x0_t - (1/2r) x0_prev.

    h = lambda_s - lambda_t, lambda = log(alpha/sigma); r = h_prev / h. First order on a
    sample's first step and on the final step to sigma = 0 (h is infinite there), as
    diffusers does with ``final_sigmas_type="zero"``.
    """

    name = "dpmpp_2m"
    depth = 1

    @staticmethod
    def _sigma_over_alpha(a: Tensor) -> Tensor:
        return ((1 - a) / a).sqrt()  # e^{-lambda}

    @classmethod
    def _lambda(cls, a: Tensor) -> Tensor:
        """log(alpha / sigma) at alpha-bar ``a``; +inf at a = 1, NaN where ``a`` is NaN."""
        return -torch.log(cls._sigma_over_alpha(a))

    def coefficients(self, a_t: Tensor, a_s: Tensor, a_hist: Tensor, a_after: Tensor | None = None) -> StepCoefficients:
        rho_t, rho_s = self._sigma_over_alpha(a_t), self._sigma_over_alpha(a_s)
        a = ((1 - a_s) / (1 - a_t)).sqrt()  # sigma_s / sigma_t
        exp_neg_h = rho_s / rho_t  # e^{-h}; 0 at the final step (sigma_s = 0)
        b = a_s.sqrt() * (1 - exp_neg_h)
        h = torch.log(rho_t) - torch.log(rho_s)
        h_prev = torch.log(self._sigma_over_alpha(a_hist[0])) - torch.log(rho_t)
        second = torch.isfinite(h_prev) & torch.isfinite(h)
        half_over_r = torch.where(second, 0.5 * h / h_prev * self._second_order_gain(h), torch.zeros_like(h))
        half_over_r = torch.nan_to_num(half_over_r, nan=0.0, posinf=0.0, neginf=0.0)
        w_hist = torch.cat([-half_over_r.unsqueeze(0), a_hist.new_zeros((a_hist.shape[0] - 1, a_hist.shape[1]))])
        return StepCoefficients(a, b, 1 + half_over_r, w_hist, torch.zeros_like(a))

    def _second_order_gain(self, h: Tensor) -> Tensor:
        """Factor on the higher-order terms, relative to DPM-Solver++(2M)'s (which is 1). (B,) float64."""
        return torch.ones_like(h)


class UniPC(DPMSolverPP2M):
    """UniPC (Zhao et al. 2023, "UniPC"), order 2 or 3, data prediction, B(h) = e^h - 1 ("bh2") or h ("bh1").

    In the data-prediction form below B stands for B(-h) (e^{-h} - 1 for bh2, -h for bh1), as in
    diffusers' ``B_h`` with ``hh = -h``.

    Predictor UniP-p from x_t, with the model outputs m_t (now) and m_1, m_2 of earlier steps
    (Alg. 2 of the paper; ``multistep_uni_p_bh_update`` in diffusers):

        x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) m_t - alpha_s B sum_k rho_k D_k,
        D_k = (m_k - m_t) / r_k,  r_k = (lambda_k - lambda_t) / h,  h = lambda_s - lambda_t,

    with rho = 1/2 at order 2 (so UniP-2 with bh2 is DPM-Solver++(2M) itself, and bh1 scales its
    second-order term by h / (1 - e^{-h}); the paper recommends bh1 for unconditional sampling with
    few steps) and, at order 3, (rho_1, rho_2) solving sum_k rho_k r_k^(i-1) = b_i for i = 1, 2, where
    b_i = i! phi_(i+1)(-h) / B (:meth:`_b_terms`). The order rises one per step as
    history builds up (a first step is first order), and the final step, to sigma = 0, is first
    order (the x0 estimate itself: h is infinite there).

    The corrector UniC reuses the model output m_s that the next step evaluates anyway at the
    predicted x_s, so it costs no extra denoiser call. For a predictor step of order p it solves
    the p x p system sum_k rho_k r_k^(i-1) = b_i (k over the predictor's D_k and r = 1 for
    m_s - m_t) and moves x_s by the difference to the predictor:

        x_s <- x_s - alpha_s B [ sum_k (rho_k^C - rho_k^P) D_k + rho_p^C (m_s - m_t) ],

    (order 1: rho^C = 1/2). m_s stays the model output of the uncorrected x_s, as in the paper and
    diffusers' ``UniPCMultistepScheduler`` (matched step for step in the tests). diffusers' bh1 with
    ``final_sigmas_type="zero"`` multiplies its zero higher-order term by B(h) = -inf on the last
    step and returns NaN, so its bh1 is only usable with ``final_sigmas_type="sigma_min"``.

    Args:
        variant: ``"bh2"`` (default) or ``"bh1"``.
        order: 2 (default) or 3.
        lower_order_final: at order 3, the step before the last is of order 2 (diffusers' option of the same
            name and default; the sampler says which step that is through ``a_after``). Without it, order 3 on
            the digits model's fitted 10-step grid read 6x the FD of order 2 (``benchmarks/sampler_claims.py``).
    """

    name = "unipc"
    VARIANTS = ("bh1", "bh2")
    ORDERS = (2, 3)

    def __init__(self, variant: str = "bh2", order: int = 2, lower_order_final: bool = True) -> None:
        if variant not in self.VARIANTS:
            raise ValueError(f"UniPC variant must be one of {self.VARIANTS} (its B(h)), got {variant!r}")
        if order not in self.ORDERS:
            raise ValueError(f"UniPC order must be one of {self.ORDERS}, got {order!r}")
        if not isinstance(lower_order_final, bool):
            raise ValueError(f"UniPC lower_order_final must be true or false, got {lower_order_final!r}")
        self.variant, self.order, self.lower_order_final = variant, int(order), lower_order_final
        self.depth = self.order  # the corrector of an order-p step reads m_t and the p - 1 outputs before it

    def _b(self, h: Tensor) -> Tensor:
        """B(-h) of UniPC's data-prediction form: e^{-h} - 1 (bh2) or -h (bh1). (B,) float64."""
        return torch.expm1(-h) if self.variant == "bh2" else -h

    def _second_order_gain(self, h: Tensor) -> Tensor:
        gain = self._b(h) / torch.expm1(-h)  # 1 for bh2; h / (1 - e^{-h}) for bh1
        return torch.where(torch.isfinite(gain), gain, torch.ones_like(h))

    def _b_terms(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """UniPC's right-hand sides b_1, b_2, b_3 (each (B,) float64): b_i = i! phi_(i+1)(-h) / B(-h), with
        phi_2 = (e^{-h} - 1)/(-h) - 1 and phi_(i+1) = phi_i / (-h) - 1/i! (diffusers' ``h_phi_k`` recursion)."""
        B, hh = self._b(h), -h
        phi = torch.expm1(hh) / hh - 1
        terms, factorial = [], 1
        for i in (1, 2, 3):
            terms.append(phi * factorial / B)
            factorial *= i + 1
            phi = phi / hh - 1 / factorial
        return terms[0], terms[1], terms[2]

    def _ratios(self, a_t: Tensor, a_s: Tensor, a_hist: Tensor) -> tuple[Tensor, Tensor]:
        """h = lambda_s - lambda_t (B,) and r_k = (lambda_k - lambda_t) / h for the memory's steps (K,B)."""
        h = self._lambda(a_s) - self._lambda(a_t)
        return h, (self._lambda(a_hist) - self._lambda(a_t)) / h

    @staticmethod
    def _predictor_rhos(r1: Tensor, r2: Tensor, b1: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
        """UniP-3's (rho_1, rho_2), each (B,): rho_1 + rho_2 = b_1, r_1 rho_1 + r_2 rho_2 = b_2 (Cramer's rule)."""
        return (b1 * r2 - b2) / (r2 - r1), (b2 - b1 * r1) / (r2 - r1)

    def predictor_order(self, a_t: Tensor, a_s: Tensor, a_hist: Tensor, a_after: Tensor | None = None) -> Tensor:
        """The order of each sample's predictor step (B,) long: 1 + the earlier steps it uses, at most ``order``;
        1 on the final step (h is infinite) and, with ``lower_order_final``, at most 2 on the one before it
        (``a_after`` = 1), as diffusers' ``lower_order_final``."""
        h, r = self._ratios(a_t, a_s, a_hist)
        second = torch.isfinite(h) & torch.isfinite(r[0])
        third = second & torch.isfinite(r[1]) if self.order >= 3 else torch.zeros_like(second)
        if self.order >= 3 and self.lower_order_final:
            if a_after is None:
                raise ValueError("UniPC of order 3 with lower_order_final needs a_after, a at the grid point after the "
                                 "step (the Sampler passes it); pass it, or set lower_order_final=False")
            third = third & (a_after < 1)
        return 1 + second.long() + third.long()

    def coefficients(self, a_t: Tensor, a_s: Tensor, a_hist: Tensor, a_after: Tensor | None = None) -> StepCoefficients:
        c = super().coefficients(a_t, a_s, a_hist)  # orders 1 and 2
        third = self.predictor_order(a_t, a_s, a_hist, a_after) == 3
        if not bool(third.any()):
            return c
        h, r = self._ratios(a_t, a_s, a_hist)
        b1, b2, _ = self._b_terms(h)
        rho1, rho2 = self._predictor_rhos(r[0], r[1], b1, b2)
        gain = self._second_order_gain(h)
        w1, w2 = gain * rho1 / r[0], gain * rho2 / r[1]  # - alpha_s B rho_k D_k over b = alpha_s (1 - e^{-h})
        w_hist = c.w_hist.clone()
        w_hist[0], w_hist[1] = torch.where(third, w1, w_hist[0]), torch.where(third, w2, w_hist[1])
        return c._replace(w_cur=torch.where(third, 1 - w1 - w2, c.w_cur), w_hist=w_hist)

    def memory(self, x: Tensor) -> CorrectorMemory:
        return CorrectorMemory.empty(x, self.depth)

    def step(
        self, x: Tensor, amp: Tensor, x0: Tensor, amp_x0: Tensor, a_t: Tensor, a_s: Tensor, memory: Memory,
        noise: NoiseSampler, a_after: Tensor | None = None,
    ) -> StepOut:
        """Correct x_t with the model output just evaluated there (UniC), then predict x_s (UniP)."""
        if not isinstance(memory, CorrectorMemory):
            raise TypeError(f"UniPC steps with its CorrectorMemory (UniPC().memory(x)), got {type(memory).__name__}")
        x, amp = self.correct(x, amp, x0, amp_x0, a_t, memory)
        out = super().step(x, amp, x0, amp_x0, a_t, a_s, memory, noise, a_after)
        order = self.predictor_order(a_t, a_s, memory.a, a_after)
        # x_pred is a copy: callbacks edit x_next in place
        return out._replace(memory=replace(out.memory, x_pred=out.x_next.clone(), order=order))

    def correct(
        self, x: Tensor, amp: Tensor, x0: Tensor, amp_x0: Tensor, a_t: Tensor, memory: CorrectorMemory
    ) -> tuple[Tensor, Tensor]:
        """x_t and its amplitude after UniC: x += c_t m_t + sum_k c_k m_k (the memory's), amplitudes alike.

        m_t = ``x0`` is the model output at the uncorrected x_t (as in UniPC); only pixels the
        previous predictor step produced are moved (none on a first step or after a restart).
        """
        c_now, c_hist = self.corrector(a_t, memory.a, memory.order)
        mask = (x == memory.x_pred) & NoiseSchedule.broadcast(torch.isfinite(c_now) & torch.isfinite(c_hist[0]), x)
        c_now, c_hist = torch.nan_to_num(c_now), torch.nan_to_num(c_hist)
        x_c = self._combine(x + NoiseSchedule.broadcast(c_now, x) * x0, c_hist, memory.x0)
        amp_c = self._combine(amp + NoiseSchedule.broadcast(c_now, x) * amp_x0, c_hist, memory.amp_x0)
        return torch.where(mask, x_c, x), torch.where(mask, amp_c, amp)

    def corrector(self, a_s: Tensor, a_hist: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
        """Weights c_s (B,) and c_hist (K,B), float64: x_s += c_s m_s + sum_k c_hist[k] m_hist[k].

        a_s: a at the point just evaluated; a_hist: the memory's (K,B), newest first, so a_hist[0] is the
        previous step's start t; order (B,) long: the previous predictor step's order (1-3). Where there
        is no previous step c_s and c_hist[0] are NaN (:meth:`correct` then leaves x as it is).
        """
        h, r = self._ratios(a_hist[0], a_s, a_hist[1:])
        scale = a_s.sqrt() * self._b(h)  # alpha_s B
        b1, b2, b3 = self._b_terms(h)
        c_hist = torch.zeros_like(a_hist)
        second = order >= 2  # order 2: rho^C solves [[1, 1], [r_1, 1]] rho = (b_1, b_2)
        r1 = torch.where(second, r[0], torch.full_like(h, -1.0))  # placeholder where unused
        rho_0 = (b1 - b2) / (1 - r1)
        rho_1 = b1 - rho_0
        c_s = torch.where(second, -scale * rho_1, -0.5 * scale)
        c_hist[1] = torch.where(second, -scale * (rho_0 - 0.5) / r1, torch.zeros_like(h))
        third = order == 3
        if bool(third.any()):
            c_s3, c_13, c_23 = self._third_order_corrector(scale, r, b1, b2, b3, third)
            c_s = torch.where(third, c_s3, c_s)
            c_hist[1], c_hist[2] = torch.where(third, c_13, c_hist[1]), torch.where(third, c_23, c_hist[2])
        c_hist[0] = -c_s - c_hist[1:].sum(0)  # the weights of a correction sum to zero
        return c_s, c_hist

    def _third_order_corrector(
        self, scale: Tensor, r: Tensor, b1: Tensor, b2: Tensor, b3: Tensor, rows: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """UniC-3's weights on m_s, m_1, m_2 (each (B,)) after a UniP-3 step, valid where ``rows`` (B,) bool.

        Solves [[1, 1, 1], [r_1, r_2, 1], [r_1^2, r_2^2, 1]] rho^C = (b_1, b_2, b_3) per sample (a 3 x 3
        system, torch.linalg.solve; rows not of order 3 solve a stand-in system with r = (-1, -2), whose
        result is discarded).
        """
        r1, r2 = (torch.where(rows, v, torch.full_like(v, -1.0 - i)) for i, v in enumerate(r[:2]))
        one = torch.ones_like(r1)
        system = torch.stack([torch.stack([one, one, one], -1), torch.stack([r1, r2, one], -1),
                              torch.stack([r1**2, r2**2, one], -1)], -2)  # (B, 3, 3)
        rhs = torch.stack([torch.where(rows, v, one) for v in (b1, b2, b3)], -1)
        rho_c = torch.linalg.solve(system, rhs)  # (B, 3)
        rho_p1, rho_p2 = self._predictor_rhos(r1, r2, b1, b2)
        c_1 = -scale * (rho_c[:, 0] - rho_p1) / r1
        c_2 = -scale * (rho_c[:, 1] - rho_p2) / r2
        return -scale * rho_c[:, 2], c_1, c_2


STEPPERS: dict[str, type[Stepper]] = {"ddpm": DDPM, "ddim": DDIM, "dpmpp_2m": DPMSolverPP2M, "unipc": UniPC}
