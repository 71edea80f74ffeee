"""bdiff: Bayesian diffusion models whose denoiser knows how unsure it is.

Quick use::

    from bdiff import load_model
    denoiser = load_model("runs/digits/checkpoints/last.ckpt")
    pred = denoiser.predict(x_t, t)   # Prediction(eps, var_epistemic, var_aleatoric)
"""

from bdiff.checkpoint import load_model
from bdiff.denoiser import Denoiser, Prediction
from bdiff.schedule import NoiseSchedule

__all__ = ["Denoiser", "NoiseSchedule", "Prediction", "load_model"]
__version__ = "0.1.0"
