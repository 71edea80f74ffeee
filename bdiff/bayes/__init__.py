"""Pyro weight posteriors over chosen U-Net parameters, and the posterior predictive."""

from bdiff.bayes.model import BayesConfig, BayesianUNet
from bdiff.bayes.select import select_parameters

__all__ = ["BayesConfig", "BayesianUNet", "select_parameters"]
