"""The callback sampler: the product loop's step function (:mod:`bdiff.sampling.loop`) with sampler callbacks.

One stepper step per iteration, as in the product loop, plus per-sample timesteps (so a callback can send a
sample back for another pass, or choose its next step) and three hooks, in the order the callbacks are given:
``on_start`` (returns the callback's own typed output for the run), ``after_prediction`` (may replace the
prediction) and ``after_update`` (may replace the proposed x_next, or send samples back); ``on_restart``
whenever :meth:`Sampler.restart` sends samples back. Without callbacks :meth:`Sampler.sample` runs the
product loop itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from bdiff.checks import as_integer
from bdiff.denoiser import Denoiser, Prediction
from bdiff.sampling.loop import PROPAGATIONS, noise_sampler, predict, sample, x0_amplitude
from bdiff.sampling.noise import NoiseSource
from bdiff.sampling.state import SampleResult, SamplerState
from bdiff.sampling.steppers import Memory, StepContext, Stepper, Tracked
from bdiff.schedule import check_rho, check_timesteps, grid_timesteps


class SamplerCallback:
    """Hooks into the reverse process (module docstring); each may change ``state`` through the Sampler."""

    name: str = "callback"
    needs_bayes: bool = False  # True: refuses a denoiser without epistemic variance

    def check(self, denoiser: Denoiser) -> None:
        """Raise ValueError if this callback cannot work with ``denoiser`` (called before any sampling)."""
        if self.needs_bayes and not getattr(denoiser, "is_bayesian", True):
            raise ValueError(f"sampler callback {self.name!r} needs a Bayesian denoiser (epistemic variance), "
                             "but this checkpoint has no Bayesian layers (bayes.layers: none)")

    def on_start(self, state: SamplerState, sampler: Sampler) -> Any:
        """This callback's output for the run (kept in ``state.outputs[self]``), or None."""
        return None

    def on_restart(self, state: SamplerState, rows: Tensor, sampler: Sampler) -> None:
        """Samples ``rows`` (K,) were just sent back by :meth:`Sampler.restart`."""

    def after_prediction(self, state: SamplerState, sampler: Sampler) -> None: ...

    def after_update(self, state: SamplerState, sampler: Sampler) -> None: ...


class Sampler:
    """Run a stepper over a Denoiser, with sampler callbacks.

    Args:
        denoiser: anything with ``schedule``, ``image_shape`` and ``predict(x_t, t) -> Prediction``.
        stepper: a :class:`~bdiff.sampling.steppers.Stepper`.
        steps: grid steps (the last one to the clean image).
        callbacks: sampler callbacks, run in this order at every hook.
        max_iterations: bound on loop iterations (extra passes included).
        propagation: ``tweedie`` or ``independent_eps`` (:mod:`bdiff.sampling.loop`).
        spacing, rho: the grid (:func:`~bdiff.schedule.grid_timesteps`), unless ``timesteps`` gives it.
        timesteps: an explicit descending grid of ``steps`` integer timesteps in [0, T-1].

    Example:
        >>> result = Sampler(denoiser, DDIM(), steps=10).sample(16, seed=0)  # .images, .variance, .nfe
    """

    def __init__(self, denoiser: Denoiser, stepper: Stepper, steps: int, callbacks: Sequence[SamplerCallback] = (),
                 max_iterations: int | None = None, propagation: str = "tweedie", spacing: str = "trailing",
                 rho: float = 7.0, timesteps: Sequence[int] | None = None) -> None:
        if propagation not in PROPAGATIONS:
            raise ValueError(f"propagation must be one of {PROPAGATIONS}, got {propagation!r}")
        if not isinstance(stepper, Stepper):
            raise ValueError(f"stepper must be a Stepper (DDPM, DDIM, DPMSolverPP2M, UniPC), got {type(stepper).__name__}")
        if not isinstance(callbacks, Sequence) or not all(isinstance(cb, SamplerCallback) for cb in callbacks):
            raise ValueError(f"callbacks must be a list of SamplerCallback instances, got {callbacks!r}")
        self.steps, self.schedule = as_integer("steps", steps, 1), denoiser.schedule
        rho = check_rho(rho)
        if timesteps is None:
            timesteps = grid_timesteps(self.schedule.alphas_cumprod, self.steps, spacing, rho)
        else:
            timesteps = check_timesteps(timesteps, self.steps, len(self.schedule.alphas_cumprod))
        self.grid = torch.tensor(list(timesteps) + [-1])
        self.denoiser, self.stepper, self.propagation, self.callbacks = denoiser, stepper, propagation, list(callbacks)
        for cb in self.callbacks:
            cb.check(denoiser)
        default = 20 * self.steps + 100
        self.max_iterations = default if max_iterations is None else as_integer("max_iterations", max_iterations, 1)

    def next_on_grid(self, t: Tensor) -> Tensor:
        """The first grid timestep strictly below each t (B,); -1 below the last one."""
        grid = self.grid.to(t.device)
        below = grid[None, :] < t[:, None]
        return torch.where(below.any(1), grid[below.float().argmax(dim=1)], torch.full_like(t, -1))

    # -- what callbacks may change ------------------------------------------------------------
    def replace_prediction(self, state: SamplerState, eps: Tensor, var_epistemic: Tensor, rows: Tensor) -> None:
        """At samples ``rows`` (B,) bool, take the noise prediction ``eps`` and its ``var_epistemic`` (B,C,H,W)
        and the x0 estimate that follows; the other samples keep theirs (after_prediction)."""
        state.prediction = state.prediction._replace(eps=eps, var_epistemic=var_epistemic)
        mask = self.schedule.broadcast(rows, state.x)
        state.x0 = self.schedule.eps_to_x0(state.x, state.t, eps).where(mask, state.x0)

    def replace_x0(self, state: SamplerState, x0: Tensor, rows: Tensor) -> None:
        """At samples ``rows`` (B,) bool, take the x0 estimate ``x0`` (B,C,H,W) and the noise prediction that
        gives it; the epistemic variance stays (after_prediction)."""
        eps = self.schedule.x0_to_eps(state.x, state.t, x0)
        mask = self.schedule.broadcast(rows, state.x)
        state.prediction = state.prediction._replace(eps=eps.where(mask, state.prediction.eps))
        state.x0 = x0.where(mask, state.x0)

    def replace_x_next(self, state: SamplerState, rows: Tensor, value: Tensor, pixels: Tensor | None = None) -> None:
        """Set x_next of samples ``rows`` (K,) to ``value`` (K,C,H,W) at ``pixels`` (K,C,H,W) bool (default all),
        and mark them edited (after_update)."""
        pixels = torch.ones_like(value, dtype=torch.bool) if pixels is None else pixels
        state.x_next[rows] = torch.where(pixels, value, state.x_next[rows])
        state.edited[rows] |= pixels

    def restart(self, state: SamplerState, rows: Tensor, t_back: int) -> None:
        """Send samples ``rows`` (K,) back to the noisier ``t_back`` (after_update): x_next is re-noised by
        q(x_{t_back} | x_{t_next}), its amplitude scaled alike; their stepper memory starts afresh."""
        s, t_up = state.t_next[rows], torch.full_like(rows, t_back)
        self.replace_x_next(state, rows, self.schedule.q_sample(state.x_next[rows], t_up, state.draw(rows), s))
        ratio = self.schedule.alpha_bar(t_up) / self.schedule.alpha_bar(s)
        state.amp_next[rows] = self.schedule.broadcast(ratio, state.amp_next).sqrt() * state.amp_next[rows]
        state.t_next[rows] = t_back
        state.restarts[rows] += 1
        state.restarted[rows] = True
        for cb in self.callbacks:
            cb.on_restart(state, rows, self)

    # -- one iteration ---------------------------------------------------------------------------
    def _predict(self, state: SamplerState) -> None:
        rows = state.active.nonzero().squeeze(1)
        pred = predict(self.denoiser, state.x[rows], state.t[rows])
        full = [torch.zeros_like(state.x) for _ in range(3)]
        for buf, part in zip(full, pred):
            buf[rows] = part
        state.prediction = Prediction(*full)
        state.nfe[rows] += 1
        state.x0 = self.schedule.eps_to_x0(state.x, state.t, state.prediction.eps)

    def _step(self, state: SamplerState, memory: Memory) -> Memory:
        """The stepper's step from (x, t) to t_next into x_next/amp_next; the memory once it is taken."""
        ctx = StepContext.between(self.schedule, state.t, state.t_next, self.next_on_grid(state.t_next))
        amp_x0 = x0_amplitude(self.schedule, state.amp, state.t, state.prediction, self.propagation)
        (state.x_next, state.amp_next), proposed = self.stepper.step(
            Tracked(state.x, state.amp), Tracked(state.x0, amp_x0), ctx, memory,
            noise_sampler(state.noise, state.x, state.active))
        state.edited = torch.zeros_like(state.x, dtype=torch.bool)
        return proposed

    def _commit(self, state: SamplerState, memory: Memory, proposed: Memory) -> Memory:
        """Active samples move to (x_next, t_next); the stepper memory after this iteration."""
        rows = state.active.nonzero().squeeze(1)
        state.x[rows], state.amp[rows] = state.x_next[rows], state.amp_next[rows]
        state.t[rows] = state.t_next[rows]
        state.t_next[rows] = self.next_on_grid(state.t[rows])
        proposed = proposed.edited(state.edited)
        memory = proposed if bool(state.active.all()) else memory.where(state.active, proposed)
        return memory.where(state.restarted, self.stepper.memory(state.x)) if bool(state.restarted.any()) else memory

    # -- the loop ---------------------------------------------------------------------------------
    def init_state(self, x_T: Tensor, noise: NoiseSource) -> SamplerState:
        """Every sample at the grid's first timestep, with its random stream from ``noise``."""
        b, device = x_T.shape[0], x_T.device
        t = torch.full((b,), int(self.grid[0]), device=device, dtype=torch.long)
        zeros, no = torch.zeros(b, device=device, dtype=torch.long), torch.zeros(b, dtype=torch.bool, device=device)
        return SamplerState(x=x_T.clone(), amp=torch.zeros_like(x_T), t=t, t_next=self.next_on_grid(t), active=t >= 0,
                            nfe=zeros.clone(), flags=no.clone(), restarts=zeros, restarted=no, noise=noise)

    @torch.no_grad()
    def run(self, x_T: Tensor, noise: NoiseSource) -> SamplerState:
        """The reverse process from x_T (B,C,H,W) with per-sample streams ``noise``; returns the final state."""
        check_x_T(self.denoiser, x_T)
        state = self.init_state(x_T, noise)
        memory = self.stepper.memory(x_T)
        state.outputs = {cb: cb.on_start(state, self) for cb in self.callbacks}
        while not state.finished:
            if state.step >= self.max_iterations:
                raise RuntimeError(f"sampler stopped after max_iterations={self.max_iterations} iterations")
            state.active, state.restarted = state.t >= 0, torch.zeros_like(state.restarted)
            self._predict(state)
            for cb in self.callbacks:
                cb.after_prediction(state, self)
            proposed = self._step(state, memory)
            for cb in self.callbacks:
                cb.after_update(state, self)
            memory = self._commit(state, memory, proposed)
            state.step += 1
        return state

    def sample(self, n: int, seed: int = 0, first_index: int = 0, device: torch.device | str = "cpu",
               clip: bool = True) -> SampleResult:
        """Samples ``first_index .. first_index+n-1`` of run ``seed`` (each depends only on (seed, i)); without
        callbacks by the product loop (:func:`bdiff.sampling.loop.sample`), which gives the same images."""
        n, seed, first_index = as_integer("n", n, 1), as_integer("seed", seed), as_integer("first_index", first_index, 0)
        noise = NoiseSource(seed, range(first_index, first_index + n))
        x_T = noise.draw(tuple(self.denoiser.image_shape), device=device)
        start = time.perf_counter()
        if self.callbacks or self.propagation != "tweedie":
            state = self.run(x_T, noise)
            x, amp, nfe, flags, outputs = state.x, state.amp, state.nfe, state.flags, state.outputs
        else:
            check_x_T(self.denoiser, x_T)
            x, amp = sample(self.denoiser, self.stepper, self.grid[:-1].tolist(), x_T, noise)
            nfe = torch.full((n,), self.steps, dtype=torch.long, device=x.device)
            flags, outputs = torch.zeros_like(nfe, dtype=torch.bool), {}
        seconds = time.perf_counter() - start
        return SampleResult(x.clamp(-1, 1) if clip else x, amp**2, nfe, flags, seconds, outputs)

    def sample_chunks(self, n: int, batch_size: int, seed: int = 0, device: torch.device | str = "cpu"
                      ) -> Iterator[tuple[range, SampleResult]]:
        """Samples 0..n-1 of run ``seed`` in consecutive chunks (:func:`chunk_ranges`): yields (indices, result)."""
        for indices in chunk_ranges(n, batch_size):
            yield indices, self.sample(len(indices), seed=seed, first_index=indices.start, device=device)


def check_x_T(denoiser: Denoiser, x_T: Tensor) -> None:
    """ValueError naming x_T unless it is a finite float batch (B,C,H,W) the denoiser can take."""
    if not isinstance(x_T, Tensor):
        raise ValueError(f"x_T must be a torch.Tensor (B,C,H,W), got {type(x_T).__name__}")
    shape = getattr(denoiser, "image_shape", None)
    expected = f"(B, {', '.join(map(str, shape))})" if shape is not None else "(B,C,H,W)"
    if x_T.dim() != 4 or x_T.shape[0] < 1 or (shape is not None and tuple(x_T.shape[1:]) != tuple(shape)):
        raise ValueError(f"x_T must have shape {expected} with B >= 1, got {tuple(x_T.shape)}")
    params = denoiser.parameters() if callable(getattr(denoiser, "parameters", None)) else ()
    dtype = next((p.dtype for p in params), None)
    if not x_T.is_floating_point() or (dtype is not None and x_T.dtype != dtype):
        raise ValueError(f"x_T has dtype {x_T.dtype}; the denoiser needs {dtype or 'a floating-point dtype'}")
    if not bool(torch.isfinite(x_T).all()):
        raise ValueError("x_T contains NaN or inf")


def chunk_ranges(n: int, batch_size: int) -> list[range]:
    """Global sample indices 0..n-1 cut into consecutive chunks of at most ``batch_size``."""
    n, batch_size = as_integer("n", n, 1), as_integer("batch_size", batch_size, 1)
    return [range(lo, min(n, lo + batch_size)) for lo in range(0, n, batch_size)]
