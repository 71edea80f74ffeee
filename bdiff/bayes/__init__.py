"""Pyro weight posteriors over chosen U-Net parameters, and the posterior predictive."""

import pyro

# Module-local params: PyroModule parameters stay ordinary nn.Parameters of their module, so two
# models (or two tests) never share Pyro's global param store by site name. Pyro reads this setting
# at every PyroModule attribute access, not only at construction, so it cannot be scoped to a
# constructor; it is set once here, before any bdiff PyroModule exists (importing any bdiff.bayes
# module runs this file first).
pyro.settings.set(module_local_params=True)

from bdiff.bayes.model import (  # noqa: E402  (after the setting above)
    BayesConfig,
    BayesianUNet,
    NegativeElbo,
    NonFiniteElboError,
    guide_state_key,
    posterior_loc_scale,
)
from bdiff.bayes.select import select_parameters  # noqa: E402

__all__ = [
    "BayesConfig",
    "BayesianUNet",
    "NegativeElbo",
    "NonFiniteElboError",
    "guide_state_key",
    "posterior_loc_scale",
    "select_parameters",
]
