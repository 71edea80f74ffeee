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
    dx_s = a dx_t + b (w_cur dx0 + sum_k w_k dx0_k)

with the same standard-normal xi at every step (the same weights act at every
step: perturbations add coherently), carried as a signed amplitude; the map is
its square. Dropping the Jacobian term (treating eps_hat as independent of x_t)
overestimates the final variance 100x on the digits model; see BENCHMARKS.md,
"Propagated uncertainty map", for the comparison with Monte Carlo chains.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bdiff.checks import as_integer
from bdiff.denoiser import Denoiser, Prediction
from bdiff.sampling.noise import NoiseSource
from bdiff.sampling.state import SamplerState
from bdiff.sampling.steppers import Memory, Stepper, StepOut
from bdiff.schedule import check_rho, check_timesteps, grid_timesteps


class SamplerCallback:
    """Hooks into the reverse process; each may change the public fields of ``state`` in place.

    Every iteration: ``before_model``, the denoiser call, ``after_prediction``, the stepper's
    step, ``after_update``, the commit. ``on_start``/``on_end`` once; ``on_restart`` whenever
    :meth:`Sampler.restart` sends samples back.
    """

    name: str = "callback"
    needs_bayes: bool = False  # True: refuses a denoiser without epistemic variance

    def check(self, denoiser: Denoiser) -> None:
        """Raise ValueError if this callback cannot work with ``denoiser`` (called before any sampling)."""
        if self.needs_bayes and not getattr(denoiser, "is_bayesian", True):
            raise ValueError(
                f"sampler callback {self.name!r} needs a Bayesian denoiser (epistemic variance), "
                "but this checkpoint has no Bayesian layers (bayes.layers: none)"
            )

    def on_start(self, state: SamplerState, sampler: Sampler) -> None: ...

    def on_restart(self, state: SamplerState, rows: Tensor, sampler: Sampler) -> None:
        """Samples ``rows`` (K,) were just sent back by :meth:`Sampler.restart` (per-sample memory starts afresh)."""

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
            steps at high noise as ``rho`` falls; :func:`~bdiff.schedule.karras_timesteps`).
        rho: the Karras exponent (ignored for ``trailing``).
        timesteps: an explicit descending grid of ``steps`` integer timesteps in [0, T-1] (e.g. one
            fitted to the denoiser, :mod:`bdiff.sampling.fitted_grid`); replaces ``spacing``.
        callbacks: sampler callbacks, run in this order at every hook.
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
        max_iterations: int | None = None,
        propagation: str = "tweedie",
        spacing: str = "trailing",
        rho: float = 7.0,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        rho = check_rho(rho)
        if not isinstance(propagation, str) or propagation not in ("tweedie", "independent_eps"):
            raise ValueError(f"propagation must be 'tweedie' or 'independent_eps', got {propagation!r}")
        self.propagation = propagation
        if not isinstance(stepper, Stepper):
            raise ValueError(f"stepper must be a Stepper (DDPM, DDIM, DPMSolverPP2M, UniPC), got {type(stepper).__name__}")
        steps = as_integer("steps", steps, 1)
        if max_iterations is not None:
            max_iterations = as_integer("max_iterations", max_iterations, 1)
        self.schedule, self.spacing, self.rho = denoiser.schedule, spacing, rho
        if timesteps is None:
            timesteps = grid_timesteps(self.schedule.alphas_cumprod, steps, spacing, rho)
        else:
            timesteps = check_timesteps(timesteps, steps, len(self.schedule.alphas_cumprod))
        self.grid = torch.tensor(list(timesteps) + [-1])
        if not isinstance(callbacks, Sequence) or not all(isinstance(cb, SamplerCallback) for cb in callbacks):
            raise ValueError(f"callbacks must be a list of SamplerCallback instances, got {callbacks!r}")
        self.denoiser, self.stepper, self.steps = denoiser, stepper, steps
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            cb.check(denoiser)
        self.max_iterations = max_iterations or 20 * steps + 100

    # -- grid -----------------------------------------------------------------
    def next_on_grid(self, t: Tensor) -> Tensor:
        """The first grid timestep strictly below each t (B,); -1 below the last one."""
        grid = self.grid.to(t.device)
        below = grid[None, :] < t[:, None]
        idx = below.float().argmax(dim=1)  # first True (the grid is descending)
        return torch.where(below.any(1), grid[idx], torch.full_like(t, -1))

    def restart(self, state: SamplerState, rows: Tensor, t_back: int) -> None:
        """Send samples ``rows`` (K,) back to the noisier ``t_back`` for another pass (call it after the update).

        Their proposed x_next is re-noised by the forward process q(x_{t_back} | x_{t_next})
        (:meth:`NoiseSchedule.q_sample`), its amplitude scaled alike; the stepper's memory for them
        is cleared when the step is committed (the next step is first order) and every callback's
        ``on_restart`` runs.
        """
        s, t_up = state.t_next[rows], torch.full_like(rows, t_back)
        state.x_next[rows] = self.schedule.q_sample(state.x_next[rows], t_up, state.draw(rows), s)
        ratio = self.schedule.alpha_bar(t_up) / self.schedule.alpha_bar(s)
        state.amp_next[rows] = self.schedule.broadcast(ratio, state.amp_next).sqrt() * state.amp_next[rows]
        state.t_next[rows] = t_back
        state.restarts[rows] += 1
        state.restarted[rows] = True
        for cb in self.callbacks:
            cb.on_restart(state, rows, self)

    # -- one step ---------------------------------------------------------------
    def _predict(self, state: SamplerState) -> None:
        """The Prediction at the active rows of (x, t), the x0 estimate and its epistemic variance."""
        rows = state.active.nonzero().squeeze(1)
        pred = self.denoiser.predict(state.x[rows], state.t[rows])
        full = [torch.zeros_like(state.x) for _ in range(3)]
        for buf, part in zip(full, pred):
            buf[rows] = part.to(buf.dtype)
        state.prediction = Prediction(*full)
        state.nfe[rows] += 1
        state.x0 = self.schedule.eps_to_x0(state.x, state.t, state.prediction.eps)
        state.x0_var = self.schedule.x0_variance(state.t, state.prediction.var_epistemic)

    def replace_prediction(self, state: SamplerState, eps: Tensor, var_epistemic: Tensor, rows: Tensor) -> None:
        """For callbacks that change the noise prediction (after_prediction): at samples ``rows`` (B,) bool, take
        ``eps`` and ``var_epistemic`` (B,C,H,W) and the x0 estimate and its variance that follow from them; the
        other samples keep theirs."""
        state.prediction = state.prediction._replace(eps=eps, var_epistemic=var_epistemic)
        mask = self.schedule.broadcast(rows, state.x)
        state.x0 = self.schedule.eps_to_x0(state.x, state.t, eps).where(mask, state.x0)
        state.x0_var = self.schedule.x0_variance(state.t, var_epistemic).where(mask, state.x0_var)

    def _amp_x0(self, state: SamplerState) -> Tensor:
        """Signed amplitude of the x0 estimate's weight-posterior perturbation (module docstring). (B,C,H,W)."""
        v_al = state.prediction.var_aleatoric.clamp(0, 1)
        if self.propagation == "independent_eps":
            v_al = torch.ones_like(v_al)  # Jacobian of eps_hat taken as zero
        alpha_t = self.schedule.alpha_bar(state.t, state.x).sqrt()
        return v_al * state.amp / alpha_t - state.x0_var.clamp(min=0).sqrt()

    def _propose(self, state: SamplerState, memory: Memory) -> Memory:
        """The stepper's step from (x, t) to t_next into ``state.x_next``/``amp_next``; the memory if it is taken."""
        def noise(need: Tensor) -> Tensor:
            rows = (state.active & need).nonzero().squeeze(1)
            z = torch.zeros_like(state.x)
            z[rows] = state.draw(rows)
            return z

        a_t, a_s = self.schedule.alpha_bar(state.t), self.schedule.alpha_bar(state.t_next)
        a_after = self.schedule.alpha_bar(self.next_on_grid(state.t_next))  # 1 where the next step is the last
        out: StepOut = self.stepper.step(state.x, state.amp, state.x0, self._amp_x0(state), a_t, a_s, memory, noise,
                                         a_after=a_after)
        state.x_next, state.amp_next, state.accept = out.x_next, out.amp_next, state.active.clone()
        return out.memory

    def _commit(self, state: SamplerState, memory: Memory, proposed: Memory) -> Memory:
        """Accepted samples move to (x_next, t_next); the stepper memory after this iteration."""
        ok = state.accept & state.active
        rows = ok.nonzero().squeeze(1)
        state.x[rows] = state.x_next[rows]
        state.amp[rows] = state.amp_next[rows]
        state.t[rows] = state.t_next[rows]
        state.t_next[rows] = self.next_on_grid(state.t[rows])
        state.rejected += (state.active & ~state.accept).long()
        memory = proposed if bool(ok.all()) else memory.where(ok, proposed)
        return memory.where(state.restarted, self.stepper.memory(state.x)) if bool(state.restarted.any()) else memory

    # -- the loop ---------------------------------------------------------------
    def _check_x_T(self, x_T: Tensor) -> None:
        """ValueError naming x_T unless it is a finite float batch (B,C,H,W) the denoiser can take."""
        if not isinstance(x_T, Tensor):
            raise ValueError(f"x_T must be a torch.Tensor (B,C,H,W), got {type(x_T).__name__}")
        shape = getattr(self.denoiser, "image_shape", None)
        expected = f"(B, {', '.join(map(str, shape))})" if shape is not None else "(B,C,H,W)"
        if x_T.dim() != 4 or x_T.shape[0] < 1 or (shape is not None and tuple(x_T.shape[1:]) != tuple(shape)):
            raise ValueError(f"x_T must have shape {expected} with B >= 1, got {tuple(x_T.shape)}")
        params = self.denoiser.parameters() if callable(getattr(self.denoiser, "parameters", None)) else ()
        dtype = next((p.dtype for p in params), None)
        if not x_T.is_floating_point() or (dtype is not None and x_T.dtype != dtype):
            raise ValueError(f"x_T has dtype {x_T.dtype}; the denoiser needs {dtype or 'a floating-point dtype'}")
        if not bool(torch.isfinite(x_T).all()):
            raise ValueError("x_T contains NaN or inf")

    def init_state(self, x_T: Tensor, noise: NoiseSource) -> SamplerState:
        """Every sample at the grid's first timestep, with its random stream from ``noise``."""
        b = x_T.shape[0]
        t = torch.full((b,), int(self.grid[0]), device=x_T.device, dtype=torch.long)
        zeros = torch.zeros(b, device=x_T.device, dtype=torch.long)
        no = torch.zeros(b, dtype=torch.bool, device=x_T.device)
        return SamplerState(
            x=x_T.clone(), t=t, t_next=self.next_on_grid(t), active=t >= 0, amp=torch.zeros_like(x_T),
            nfe=zeros.clone(), rejected=zeros.clone(), flags=no.clone(), restarts=zeros.clone(), restarted=no.clone(),
            noise=noise,
        )

    def _hook(self, name: str, state: SamplerState) -> None:
        for cb in self.callbacks:
            getattr(cb, name)(state, self)

    @torch.no_grad()
    def run(self, x_T: Tensor, noise: NoiseSource) -> SamplerState:
        """Run the reverse process from x_T (B,C,H,W) with per-sample streams ``noise``; returns the final state."""
        self._check_x_T(x_T)
        state = self.init_state(x_T, noise)
        memory = self.stepper.memory(x_T)  # local: one Sampler can run several jobs at once
        self._hook("on_start", state)
        while not state.finished:
            if state.step >= self.max_iterations:
                raise RuntimeError(f"sampler stopped after max_iterations={self.max_iterations} iterations")
            state.active, state.restarted = state.t >= 0, torch.zeros_like(state.restarted)
            self._hook("before_model", state)
            self._predict(state)
            self._hook("after_prediction", state)
            proposed = self._propose(state, memory)
            self._hook("after_update", state)
            memory = self._commit(state, memory, proposed)
            state.step += 1
        self._hook("on_end", state)
        return state

    def sample_chunks(
        self, n: int, batch_size: int, seed: int = 0, device: torch.device | str = "cpu"
    ) -> Iterator[tuple[range, SampleResult]]:
        """Samples 0..n-1 of run ``seed`` in consecutive chunks (:func:`chunk_ranges`): yields (indices, result).

        Memory holds one chunk; sample i is the same whatever ``batch_size`` is.
        """
        for indices in chunk_ranges(n, batch_size):
            yield indices, self.sample(len(indices), seed=seed, first_index=indices.start, device=device)

    def sample(
        self, n: int, seed: int = 0, first_index: int = 0, device: torch.device | str = "cpu", clip: bool = True
    ) -> SampleResult:
        """Draw samples ``first_index .. first_index+n-1`` of run ``seed`` (each depends only on (seed, i))."""
        n, seed, first_index = as_integer("n", n, 1), as_integer("seed", seed), as_integer("first_index", first_index, 0)
        shape = tuple(self.denoiser.image_shape)
        noise = NoiseSource(seed, range(first_index, first_index + n))
        x_T = noise.draw(shape, device=device)
        start = time.perf_counter()
        state = self.run(x_T, noise)
        seconds = time.perf_counter() - start
        images = state.x.clamp(-1, 1) if clip else state.x
        return SampleResult(images, state.var, state.nfe, state.rejected, state.flags, seconds, state.extras)


def chunk_ranges(n: int, batch_size: int) -> list[range]:
    """Global sample indices 0..n-1 cut into consecutive chunks of at most ``batch_size``."""
    n, batch_size = as_integer("n", n, 1), as_integer("batch_size", batch_size, 1)
    return [range(lo, min(n, lo + batch_size)) for lo in range(0, n, batch_size)]
