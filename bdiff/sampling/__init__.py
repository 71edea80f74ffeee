"""Reverse-process samplers. Knows only the Denoiser protocol (never Pyro)."""

from bdiff.sampling.ddim import chain_variance, ddim_sample_and_variance
from bdiff.sampling.sampler import SampleResult, Sampler, SamplerCallback
from bdiff.sampling.state import SamplerState
from bdiff.sampling.steppers import DDIM, DDPM, DPMSolverPP2M, Stepper, UniPC
from bdiff.schedule import ddim_timesteps, karras_timesteps

__all__ = [
    "DDIM",
    "DDPM",
    "DPMSolverPP2M",
    "SampleResult",
    "Sampler",
    "SamplerCallback",
    "SamplerState",
    "Stepper",
    "UniPC",
    "chain_variance",
    "ddim_sample_and_variance",
    "ddim_timesteps",
    "karras_timesteps",
]
