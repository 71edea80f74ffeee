"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), data prediction, order 2 or 3.

With m the model's x0 estimates, h = lambda_s - lambda_t (lambda = log(alpha/sigma)), B = B(-h)
(e^{-h} - 1 for "bh2", -h for "bh1"; diffusers' ``B_h`` with ``hh = -h``) and r_k = (lambda_k - lambda_t)/h:

* predictor UniP-p (Alg. 2; diffusers' ``multistep_uni_p_bh_update``):
  x_s = (sigma_s/sigma_t) x_t + alpha_s (1 - e^{-h}) m_t - alpha_s B sum_k rho_k D_k, D_k = (m_k - m_t)/r_k,
  with rho = 1/2 at order 2 (UniP-2 with bh2 is DPM-Solver++(2M)) and, at order 3, sum_k rho_k r_k^(i-1) = b_i
  for i = 1, 2, b_i = i! phi_(i+1)(-h) / B. The order rises by one per step as history builds up; the final
  step (to sigma = 0, h infinite) is first order, and with ``lower_order_final`` the one before it at most 2.
* corrector UniC: at the start of the next step, with the model output m_s just evaluated at the predicted
  x_s (no extra call), solve the p x p system with r = 1 for m_s - m_t and move x_s by
  -alpha_s B [sum_k (rho^C_k - rho^P_k) D_k + rho^C_p (m_s - m_t)] (order 1: rho^C = 1/2). m_s stays the
  model output at the uncorrected x_s, as in the paper and diffusers (matched step for step in the tests).
  Only pixels the predictor produced and no sampler callback replaced are corrected (:class:`UniPCMemory`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from bdiff.sampling.steppers import (
    Exponential, Memory, NoiseSampler, StepCoefficients, StepContext, Stepper, Tracked, _bcast, combine,
)


@dataclass(frozen=True)
class UniPCMemory(Memory):
    """:class:`Memory` plus the ``order`` (B,) long of each sample's last predictor step (0: none) and the
    ``fresh`` (B,C,H,W) bool pixels of x that are still that step's output: the corrector moves only those."""

    order: Tensor
    fresh: Tensor

    @classmethod
    def empty(cls, x: Tensor, depth: int) -> UniPCMemory:
        blank = Memory.empty(x, depth)
        order = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return cls(blank.a, blank.x0, blank.amp_x0, order, torch.zeros_like(x, dtype=torch.bool))

    def edited(self, pixels: Tensor) -> UniPCMemory:
        return replace(self, fresh=self.fresh & ~pixels)


class UniPC(Stepper):
    """UniPC's predictor and corrector (module docstring).

    Args:
        variant: ``"bh2"`` (default) or ``"bh1"`` (the paper's choice for unconditional sampling with few steps).
        order: 2 (default) or 3.
        lower_order_final: at order 3, the step before the last is of order 2 (diffusers' option and default).
    """

    name = "unipc"
    memory_type = UniPCMemory
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
        self.depth = self.order  # the corrector after an order-p step reads m_t and the p - 1 outputs before it

    def step(self, x: Tracked, x0: Tracked, ctx: StepContext, memory: Memory, noise: NoiseSampler
             ) -> tuple[Tracked, Memory]:
        """Correct x_t with the model output just evaluated there (UniC), then predict x_s (UniP)."""
        self._check(memory)
        assert isinstance(memory, UniPCMemory)
        x = self.correct(x, x0, ctx, memory)
        coefficients, order = self.predictor(ctx, memory.a)
        x_next = coefficients.apply(x, x0, memory, noise)
        pushed = memory.pushed(ctx.a_t, x0)
        return x_next, replace(pushed, order=order, fresh=torch.ones_like(memory.fresh))

    def coefficients(self, ctx: StepContext, a_hist: Tensor) -> StepCoefficients:
        return self.predictor(ctx, a_hist)[0]

    def _b(self, h: Tensor) -> Tensor:
        """B(-h): e^{-h} - 1 (bh2) or -h (bh1). (B,) float64."""
        return torch.expm1(-h) if self.variant == "bh2" else -h

    def _b_terms(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """b_i = i! phi_(i+1)(-h) / B(-h), i = 1..3, each (B,) float64; phi_2 = (e^{-h} - 1)/(-h) - 1,
        phi_(i+1) = phi_i / (-h) - 1/i! (diffusers' ``h_phi_k`` recursion)."""
        B, hh = self._b(h), -h
        phi, factorial, terms = torch.expm1(hh) / hh - 1, 1, []
        for i in (1, 2, 3):
            terms.append(phi * factorial / B)
            factorial *= i + 1
            phi = phi / hh - 1 / factorial
        return terms[0], terms[1], terms[2]

    @staticmethod
    def _rhos(r1: Tensor, r2: Tensor, b1: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
        """UniP-3's (rho_1, rho_2): rho_1 + rho_2 = b_1, r_1 rho_1 + r_2 rho_2 = b_2 (Cramer's rule)."""
        return (b1 * r2 - b2) / (r2 - r1), (b2 - b1 * r1) / (r2 - r1)

    def predictor(self, ctx: StepContext, a_hist: Tensor) -> tuple[StepCoefficients, Tensor]:
        """UniP's coefficients and each sample's order (B,) long (1 + the earlier steps it uses)."""
        e = Exponential.of(ctx.a_t, ctx.a_s, a_hist)
        second = torch.isfinite(e.h) & torch.isfinite(e.r[0])
        third = torch.zeros_like(second)
        if self.order == 3:
            third = second & torch.isfinite(e.r[1]) & ((ctx.a_after < 1) | (not self.lower_order_final))
        gain = self._b(e.h) / torch.expm1(-e.h)  # 1 for bh2; h / (1 - e^{-h}) for bh1
        gain = torch.where(torch.isfinite(gain), gain, torch.ones_like(gain))
        zero = torch.zeros_like(e.h)
        w_hist = a_hist.new_zeros(a_hist.shape)
        w_hist[0] = torch.where(second, gain * 0.5 / e.r[0], zero)  # - alpha_s B rho D over b = alpha_s (1 - e^{-h})
        if bool(third.any()):
            b1, b2, _ = self._b_terms(e.h)
            rho1, rho2 = self._rhos(e.r[0], e.r[1], b1, b2)
            w_hist[0] = torch.where(third, gain * rho1 / e.r[0], w_hist[0])
            w_hist[1] = torch.where(third, gain * rho2 / e.r[1], zero)
        order = 1 + second.long() + third.long()
        return StepCoefficients(e.a, e.b, 1 - w_hist.sum(0), w_hist, zero), order

    def correct(self, x: Tracked, x0: Tracked, ctx: StepContext, memory: UniPCMemory) -> Tracked:
        """x_t after UniC: x += c_t m_t + sum_k c_k m_k, amplitudes alike, at the memory's fresh pixels of
        samples whose last step was a predictor step; m_t = ``x0``, the model output at the uncorrected x_t."""
        c_now, c_hist = self.corrector(ctx.a_t, memory.a, memory.order)
        ok = (memory.order > 0) & torch.isfinite(c_now) & torch.isfinite(c_hist[0])
        if not bool(ok.any()):
            return x
        mask = memory.fresh & _bcast(ok, x.value)
        c_now, c_hist = torch.nan_to_num(c_now), torch.nan_to_num(c_hist)
        value = combine(x.value + _bcast(c_now, x.value) * x0.value, c_hist, memory.x0)
        amp = combine(x.amp + _bcast(c_now, x.amp) * x0.amp, c_hist, memory.amp_x0)
        return Tracked(torch.where(mask, value, x.value), torch.where(mask, amp, x.amp))

    def corrector(self, a_s: Tensor, a_hist: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
        """UniC's weights c_s (B,) and c_hist (K,B), float64: x_s += c_s m_s + sum_k c_hist[k] m_hist[k].

        a_s: alpha-bar where the model was just evaluated; a_hist: the memory's (K,B), newest first (a_hist[0]
        is the previous step's start); order: the previous predictor step's (1-3). NaN where there is none.
        """
        e = Exponential.of(a_hist[0], a_s, a_hist[1:])
        scale = a_s.sqrt() * self._b(e.h)  # alpha_s B
        b1, b2, b3 = self._b_terms(e.h)
        second = order >= 2  # order 2: rho^C solves [[1, 1], [r_1, 1]] rho = (b_1, b_2)
        r1 = torch.where(second, e.r[0], torch.full_like(e.h, -1.0))  # placeholder where unused
        rho_0 = (b1 - b2) / (1 - r1)
        c_s = torch.where(second, -scale * (b1 - rho_0), -0.5 * scale)
        c_hist = torch.zeros_like(a_hist)
        c_hist[1] = torch.where(second, -scale * (rho_0 - 0.5) / r1, torch.zeros_like(e.h))
        third = order == 3
        if bool(third.any()):
            c_s3, c_13, c_23 = self._third_order_corrector(scale, e.r, (b1, b2, b3), third)
            c_s = torch.where(third, c_s3, c_s)
            c_hist[1], c_hist[2] = torch.where(third, c_13, c_hist[1]), torch.where(third, c_23, c_hist[2])
        c_hist[0] = -c_s - c_hist[1:].sum(0)  # the weights of a correction sum to zero
        return c_s, c_hist

    def _third_order_corrector(self, scale: Tensor, r: Tensor, b: tuple[Tensor, Tensor, Tensor], rows: Tensor
                               ) -> tuple[Tensor, Tensor, Tensor]:
        """UniC-3's weights on m_s, m_1, m_2 (each (B,)) after a UniP-3 step, valid where ``rows`` (B,) bool:
        [[1, 1, 1], [r_1, r_2, 1], [r_1^2, r_2^2, 1]] rho^C = (b_1, b_2, b_3) per sample (torch.linalg.solve;
        other rows solve a stand-in system with r = (-1, -2), discarded)."""
        r1, r2 = (torch.where(rows, v, torch.full_like(v, -1.0 - i)) for i, v in enumerate(r[:2]))
        one = torch.ones_like(r1)
        system = torch.stack([torch.stack([one, one, one], -1), torch.stack([r1, r2, one], -1),
                              torch.stack([r1**2, r2**2, one], -1)], -2)  # (B, 3, 3)
        rho_c = torch.linalg.solve(system, torch.stack([torch.where(rows, v, one) for v in b], -1))  # (B, 3)
        rho_p1, rho_p2 = self._rhos(r1, r2, b[0], b[1])
        return -scale * rho_c[:, 2], -scale * (rho_c[:, 0] - rho_p1) / r1, -scale * (rho_c[:, 1] - rho_p2) / r2


