"""Reverse-process samplers. Knows only the Denoiser protocol (never Pyro)."""

from bdiff.sampling.ddim import chain_variance, ddim_sample_and_variance
from bdiff.sampling.loop import sample
from bdiff.sampling.sampler import Sampler, SamplerCallback
from bdiff.sampling.state import SampleResult, SamplerState
from bdiff.sampling.steppers import DDIM, DDPM, DPMSolverPP2M, StepContext, Stepper, Tracked
from bdiff.sampling.unipc import UniPC
from bdiff.schedule import ddim_timesteps, karras_timesteps

__all__ = [
    "DDIM",
    "DDPM",
    "DPMSolverPP2M",
    "SampleResult",
    "Sampler",
    "SamplerCallback",
    "SamplerState",
    "StepContext",
    "Stepper",
    "Tracked",
    "UniPC",
    "chain_variance",
    "ddim_sample_and_variance",
    "ddim_timesteps",
    "karras_timesteps",
    "sample",
]
