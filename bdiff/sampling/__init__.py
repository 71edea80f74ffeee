"""Reverse-process samplers. Knows only the Denoiser protocol (never Pyro)."""

from bdiff.sampling.ddim import ddim_sample, ddim_timesteps

__all__ = ["ddim_sample", "ddim_timesteps"]
