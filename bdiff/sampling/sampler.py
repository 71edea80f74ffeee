"""The callback-based reverse-process sampler.

One loop for every stepper (:mod:`bdiff.sampling.steppers`) and every Denoiser;
per-sample timesteps (so step-size control can differ per sample); sampler
callbacks hook in before the model call, after the prediction, after the update
and at start/end, in the order given.

Variance propagation ("uncertainty iteration", after BayesDiff, Kou et al. 2024,
derived here for the linear form x_s = a x_t + b D + noise of every stepper):
a weight-posterior perturbation of x_t, dx_t, moves the x0 estimate through the
network's Jacobian, whose diagonal follows from Tweedie's second-order identity
for an MMSE denoiser, d E[eps|x_t]/dx_t = (I - Cov[eps|x_t]) / sigma_t, with
Cov[eps|x_t] read off the aleatoric head (clamped to [0, 1]). So per pixel

    dx0 = (v_al * dx_t) / alpha_t  -  sqrt(Var_q[x0_hat]) * xi
    dx_s = a dx_t + b (w_cur dx0 + w_prev dx0_prev)

with the same standard-normal xi at every step (the same weights act at every
step: perturbations add coherently), carried as a signed amplitude; the map is
its square. Dropping the Jacobian term (treating eps_hat as independent of x_t)
overestimates the final variance 100x on the digits model; see BENCHMARKS.md
for the comparison with Monte Carlo chains.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bdiff.denoiser import Denoiser, Prediction
from bdiff.sampling.noise import NoiseSource
from bdiff.sampling.state import SamplerState
from bdiff.sampling.steppers import SPACINGS, Stepper, alpha_bar_at, check_rho, grid_timesteps


def _integer(name: str, value: object, low: int | None = None) -> int:
    """``value`` as an int; ValueError naming ``name`` if it is not an integer (bools refused) or below ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (low is not None and value < low):
        raise ValueError(f"{name} must be an integer{f' >= {low}' if low is not None else ''}, got {value!r}")
    return int(value)


class SamplerCallback:
    """Hooks into the reverse process. Override any of them; each may change ``state`` in place."""

    name: str = "callback"
    needs_bayes: bool = False  # True: refuses a denoiser without epistemic variance

    def check(self, denoiser: Denoiser) -> None:
        """Raise ValueError if this callback cannot work with ``denoiser`` (called before any sampling)."""

    def on_start(self, state: SamplerState, sampler: Sampler) -> None: ...

    def before_model(self, state: SamplerState, sampler: Sampler) -> None: ...

    def after_prediction(self, state: SamplerState, sampler: Sampler) -> None: ...

    def after_update(self, state: SamplerState, sampler: Sampler) -> None: ...

    def on_end(self, state: SamplerState, sampler: Sampler) -> None: ...


@dataclass
class SampleResult:
    """Finished images and what it took. images/variance (N,C,H,W) in [-1,1] scale; nfe (N,)."""

    images: Tensor
    variance: Tensor
    nfe: Tensor
    rejected: Tensor
    flags: Tensor
    seconds: float
    extras: dict


class Sampler:
    """Run a stepper over a Denoiser with sampler callbacks.

    Args:
        denoiser: anything with ``schedule`` and ``predict(x_t, t) -> Prediction``.
        stepper: a :class:`Stepper` (DDPM, DDIM, DPM-Solver++ 2M, UniPC).
        steps: number of grid steps (the last one to the clean image).
        spacing: where the grid's timesteps lie: ``trailing`` (uniform in t, from T-1; the
            default of diffusers' peers) or ``karras`` (Karras et al. 2022 noise levels, more
            steps at high noise as ``rho`` falls; :func:`~bdiff.sampling.steppers.karras_timesteps`).
        rho: the Karras exponent (ignored for ``trailing``).
        callbacks: sampler callbacks, run in this order at every hook.
        history: how many earlier steps to keep in ``state.history``.
        max_iterations: hard bound on loop iterations (rejections and extra passes included).
        propagation: ``tweedie`` (the Jacobian term above) or ``independent_eps`` (drops it,
            treating eps_hat as independent of x_t; kept for comparison).

    Example:
        >>> sampler = Sampler(denoiser, DDIM(), steps=10)
        >>> result = sampler.sample(16, seed=0)       # result.images, result.variance, result.nfe
    """

    def __init__(
        self,
        denoiser: Denoiser,
        stepper: Stepper,
        steps: int,
        callbacks: Sequence[SamplerCallback] = (),
        history: int = 4,
        max_iterations: int | None = None,
        propagation: str = "tweedie",
        spacing: str = "trailing",
        rho: float = 7.0,
    ) -> None:
        if not isinstance(spacing, str) or spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {list(SPACINGS)}, got {spacing!r}")
        rho = check_rho(rho)
        if not isinstance(propagation, str) or propagation not in ("tweedie", "independent_eps"):
            raise ValueError(f"propagation must be 'tweedie' or 'independent_eps', got {propagation!r}")
        self.propagation = propagation
        if not isinstance(stepper, Stepper):
            raise ValueError(f"stepper must be a Stepper (DDPM, DDIM, DPMSolverPP2M, UniPC), got {type(stepper).__name__}")
        steps, history = _integer("steps", steps, 1), _integer("history", history, 0)
        if max_iterations is not None:
            max_iterations = _integer("max_iterations", max_iterations, 1)
        if isinstance(callbacks, SamplerCallback) or not isinstance(callbacks, Sequence):
            raise ValueError(f"callbacks must be a list of SamplerCallback, got {type(callbacks).__name__}")
        bad = [type(cb).__name__ for cb in callbacks if not isinstance(cb, SamplerCallback)]
        if bad:
            raise ValueError(f"callbacks must be SamplerCallback instances, got {bad}")
        self.denoiser, self.stepper, self.steps = denoiser, stepper, steps
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if cb.needs_bayes and not getattr(denoiser, "is_bayesian", True):
                raise ValueError(
                    f"sampler callback {cb.name!r} needs a Bayesian denoiser (epistemic variance), "
                    "but this checkpoint has no Bayesian layers (bayes.layers: none)"
                )
            cb.check(denoiser)
        self.history = history
        self.spacing, self.rho = spacing, rho
        self.grid = torch.tensor(grid_timesteps(denoiser.schedule.alphas_cumprod, steps, spacing, self.rho) + [-1])
        self.max_iterations = max_iterations or 20 * steps + 100

    # -- grid -----------------------------------------------------------------
    def next_on_grid(self, t: Tensor) -> Tensor:
        """The first grid timestep strictly below each t (B,); -1 below the last one."""
        grid = self.grid.to(t.device)
        below = grid[None, :] < t[:, None]
        idx = below.float().argmax(dim=1)  # first True (the grid is descending)
        return torch.where(below.any(1), grid[idx], torch.full_like(t, -1))

    # -- one step ---------------------------------------------------------------
    def _predict(self, state: SamplerState) -> None:
        rows = state.active.nonzero().squeeze(1)
        x, t = state.x[rows], state.t[rows]
        pred = self.denoiser.predict(x, t)
        full = [torch.zeros_like(state.x) for _ in range(3)]
        for buf, part in zip(full, pred):
            buf[rows] = part.to(buf.dtype)
        state.prediction = Prediction(*full)
        state.nfe[rows] += 1
        schedule = self.denoiser.schedule
        tt = state.t.clamp(min=0)
        state.x0 = schedule.eps_to_x0(state.x, tt, state.prediction.eps)
        state.x0_var = schedule.x0_variance(tt, state.prediction.var_epistemic)

    def _corrected(self, state: SamplerState, amp_x0: Tensor) -> tuple[Tensor, Tensor]:
        """x_t and its amplitude after a corrector stepper's correction (UniPC); new tensors.

        Uses the model output just evaluated at x_t (after the ``after_prediction`` callbacks,
        as a scheduler would receive it): x += c_now m_now + c_t m_t + c_p m_prev, the amplitude
        alongside with the x0 amplitudes ``amp_x0`` (B,C,H,W) of the same point. Only pixels that
        came straight from the previous predictor step are corrected: not the first step, not a
        restarted sample, not pixels a callback rewrote after that step (refinement, pinning).
        The estimate m_now stays that of the uncorrected x, as in UniPC. Nothing is written to
        ``state``, so a rejected and retried step is not corrected twice.
        """
        mem = state.memory
        if "fresh" not in mem:
            return state.x, state.amp
        a_now = alpha_bar_at(self.denoiser.schedule.alphas_cumprod, state.t)
        c_now, c_t, c_p = self.stepper.corrector(a_now, mem["a_prev"], mem["a_prev2"])
        rows = state.active & torch.isfinite(c_now) & torch.isfinite(c_t)
        shape = (-1,) + (1,) * (state.x.dim() - 1)
        mask = mem["fresh"] & rows.reshape(shape)
        c_now, c_t, c_p = (torch.nan_to_num(c).to(state.x.dtype).reshape(shape) for c in (c_now, c_t, c_p))
        x = torch.where(mask, state.x + c_now * state.x0 + c_t * mem["x0_prev"] + c_p * mem["x0_prev2"], state.x)
        amp = torch.where(mask, state.amp + c_now * amp_x0 + c_t * mem["amp_x0_prev"] + c_p * mem["amp_x0_prev2"], state.amp)
        return x, amp

    def _amp_x0(self, state: SamplerState, amp: Tensor) -> Tensor:
        """Signed amplitude of the x0 estimate's weight-posterior perturbation (module docstring). (B,C,H,W)."""
        v_al = state.prediction.var_aleatoric.clamp(0, 1)
        if self.propagation == "independent_eps":
            v_al = torch.ones_like(v_al)  # Jacobian of eps_hat taken as zero
        a_t = alpha_bar_at(self.denoiser.schedule.alphas_cumprod, state.t)
        alpha_t = a_t.to(state.x.dtype).sqrt().reshape((-1,) + (1,) * (state.x.dim() - 1))
        return v_al * amp / alpha_t - state.x0_var.clamp(min=0).sqrt()

    def _update(self, state: SamplerState, noise: NoiseSource) -> None:
        ac = self.denoiser.schedule.alphas_cumprod
        a_t, a_s = alpha_bar_at(ac, state.t), alpha_bar_at(ac, state.t_next)
        mem = state.memory
        a_prev = mem.setdefault("a_prev", torch.full_like(a_t, float("nan")))
        c = self.stepper.coefficients(a_t, a_s, a_prev)
        shape = (-1,) + (1,) * (state.x.dim() - 1)
        a, b, w_cur, w_prev, sd = (v.to(state.x.dtype).reshape(shape) for v in (c.a, c.b, c.w_cur, c.w_prev, c.noise_std))
        x0_prev = mem.setdefault("x0_prev", torch.zeros_like(state.x))
        # Variance propagation (module docstring): signed amplitudes, coherent across steps. The
        # x0 amplitude is that of the point the model saw, before any corrector moves x.
        amp_x0 = self._amp_x0(state, state.amp)
        x, amp = self._corrected(state, amp_x0) if self.stepper.corrects else (state.x, state.amp)
        d = w_cur * state.x0 + w_prev * x0_prev
        x_next = a * x + b * d
        if bool((c.noise_std > 0).any()):
            rows = (state.active & (c.noise_std > 0)).nonzero().squeeze(1)
            z = torch.zeros_like(state.x)
            z[rows] = noise.draw(tuple(state.x.shape[1:]), rows, state.x.device).to(state.x.dtype)
            x_next = x_next + sd * z
        amp_x0_prev = mem.setdefault("amp_x0_prev", torch.zeros_like(state.x))
        mem["amp_next"] = a * amp + b * (w_cur * amp_x0 + w_prev * amp_x0_prev)
        mem["amp_x0"] = amp_x0
        if self.stepper.corrects:
            mem["x_predicted"] = x_next.clone()  # to tell which pixels callbacks rewrite after the step
        state.x_next = x_next
        state.accept = state.active.clone()

    def _commit(self, state: SamplerState) -> None:
        ok = state.accept & state.active
        rows = ok.nonzero().squeeze(1)
        mem = state.memory
        if self.history:
            entry = {"t": torch.where(ok, state.t, -2), "x0": state.x0.clone(), "x0_var": state.x0_var.clone()}
            state.history.append(entry)  # t = -2 marks rows that took no step
            del state.history[: -self.history]
        if self.stepper.corrects:  # the corrector needs one more step of history, and which pixels it may move
            for key, prev in (("x0_prev2", "x0_prev"), ("amp_x0_prev2", "amp_x0_prev")):
                mem.setdefault(key, torch.zeros_like(state.x))[rows] = mem[prev][rows]
            mem.setdefault("a_prev2", torch.full_like(mem["a_prev"], float("nan")))[rows] = mem["a_prev"][rows]
            fresh = mem.setdefault("fresh", torch.zeros_like(state.x, dtype=torch.bool))
            fresh[rows] = state.x_next[rows] == mem["x_predicted"][rows]
        mem["x0_prev"][rows] = state.x0[rows]
        mem["amp_x0_prev"][rows] = mem["amp_x0"][rows]
        mem["a_prev"][rows] = alpha_bar_at(self.denoiser.schedule.alphas_cumprod, state.t[rows])
        state.x[rows] = state.x_next[rows]
        state.amp[rows] = mem["amp_next"][rows]
        state.t[rows] = state.t_next[rows]
        state.t_next[rows] = self.next_on_grid(state.t[rows])
        state.rejected += (state.active & ~state.accept).long()
        # A sample sent back to a noisier t starts its multistep memory afresh (first-order step).
        restarted = state.restarts != mem.setdefault("restarts", torch.zeros_like(state.restarts))
        if restarted.any():
            mem["a_prev"][restarted] = float("nan")
            if "fresh" in mem:
                mem["a_prev2"][restarted] = float("nan")
                mem["fresh"][restarted] = False
            mem["x0_prev"][restarted] = 0
            mem["amp_x0_prev"][restarted] = 0
            mem["restarts"] = state.restarts.clone()

    # -- the loop ---------------------------------------------------------------
    def _check_x_T(self, x_T: Tensor) -> None:
        """ValueError naming x_T unless it is a finite float batch (B,C,H,W) the denoiser can take."""
        if not isinstance(x_T, Tensor):
            raise ValueError(f"x_T must be a torch.Tensor (B,C,H,W), got {type(x_T).__name__}")
        shape = getattr(self.denoiser, "image_shape", None)
        expected = f"(B, {', '.join(map(str, shape))})" if shape is not None else "(B,C,H,W)"
        if x_T.dim() != 4 or x_T.shape[0] < 1 or (shape is not None and tuple(x_T.shape[1:]) != tuple(shape)):
            raise ValueError(f"x_T must have shape {expected} with B >= 1, got {tuple(x_T.shape)}")
        params = getattr(self.denoiser, "parameters", None)
        param = next(iter(params()), None) if callable(params) else None
        dtype = param.dtype if param is not None else None
        if not x_T.is_floating_point() or (dtype is not None and x_T.dtype != dtype):
            raise ValueError(f"x_T has dtype {x_T.dtype}; the denoiser needs {dtype or 'a floating-point dtype'}")
        if not bool(torch.isfinite(x_T).all()):
            raise ValueError("x_T contains NaN or inf")

    def init_state(self, x_T: Tensor) -> SamplerState:
        b = x_T.shape[0]
        t = torch.full((b,), int(self.grid[0]), device=x_T.device, dtype=torch.long)
        zeros = torch.zeros(b, device=x_T.device, dtype=torch.long)
        return SamplerState(
            x=x_T.clone(), t=t, t_next=self.next_on_grid(t), active=t >= 0, amp=torch.zeros_like(x_T),
            nfe=zeros.clone(), rejected=zeros.clone(), flags=torch.zeros(b, dtype=torch.bool, device=x_T.device),
            restarts=zeros.clone(),
        )

    @torch.no_grad()
    def run(self, x_T: Tensor, noise: NoiseSource) -> SamplerState:
        """Run the reverse process from x_T (B,C,H,W); returns the final state."""
        self._check_x_T(x_T)
        state = self.init_state(x_T)
        self.noise = noise  # per-sample streams, also for callbacks that draw noise
        for cb in self.callbacks:
            cb.on_start(state, self)
        while not state.finished:
            if state.step >= self.max_iterations:
                raise RuntimeError(f"sampler stopped after max_iterations={self.max_iterations} iterations")
            state.active = state.t >= 0
            for cb in self.callbacks:
                cb.before_model(state, self)
            self._predict(state)
            for cb in self.callbacks:
                cb.after_prediction(state, self)
            self._update(state, noise)
            for cb in self.callbacks:
                cb.after_update(state, self)
            self._commit(state)
            state.step += 1
        for cb in self.callbacks:
            cb.on_end(state, self)
        return state

    def sample(
        self, n: int, seed: int = 0, first_index: int = 0, device: torch.device | str = "cpu", clip: bool = True
    ) -> SampleResult:
        """Draw samples ``first_index .. first_index+n-1`` of run ``seed`` (each depends only on (seed, i))."""
        n, seed, first_index = _integer("n", n, 1), _integer("seed", seed), _integer("first_index", first_index, 0)
        shape = tuple(self.denoiser.image_shape)
        noise = NoiseSource(seed, range(first_index, first_index + n))
        x_T = noise.draw(shape, device=device)
        start = time.perf_counter()
        state = self.run(x_T, noise)
        seconds = time.perf_counter() - start
        images = state.x.clamp(-1, 1) if clip else state.x
        return SampleResult(images, state.var, state.nfe, state.rejected, state.flags, seconds, state.extras)
