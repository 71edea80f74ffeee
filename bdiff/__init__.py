"""bdiff: Bayesian diffusion models whose denoiser knows how unsure it is.

Quick use::

    from bdiff import load_model
    denoiser = load_model("runs/digits/checkpoints/last.ckpt")
    pred = denoiser.predict(x_t, t)   # Prediction(eps, var_epistemic, var_aleatoric)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bdiff.denoiser import Denoiser, Prediction
from bdiff.schedule import NoiseSchedule

if TYPE_CHECKING:
    from bdiff.checkpoint import load_model

__all__ = ["Denoiser", "NoiseSchedule", "Prediction", "load_model"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``load_model`` on first use (PEP 562), so ``import bdiff.schedule`` or ``bdiff.sampling`` does not load Pyro."""
    if name == "load_model":
        from bdiff.checkpoint import load_model

        return load_model
    raise AttributeError(f"module 'bdiff' has no attribute {name!r}")
