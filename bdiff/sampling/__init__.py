"""Reverse-process samplers. Knows only the Denoiser protocol (never Pyro)."""

from bdiff.sampling.ddim import chain_variance, ddim_sample, ddim_timesteps

__all__ = ["chain_variance", "ddim_sample", "ddim_timesteps"]
