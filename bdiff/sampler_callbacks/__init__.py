"""Sampler callbacks: opt-in hooks of the callback :class:`~bdiff.sampling.Sampler` (not Lightning's, :mod:`bdiff.lit.callbacks`).

What the sampler can do with the uncertainty, and other changes to the prediction:

* :class:`VarianceWeightedBlending` blends the x0 estimate with its history, weighted by the error variance;
* :class:`AdaptiveStepSize` splits a step where the x0 estimate's stated error is large;
* :class:`UncertainRegionRefinement` re-noises and re-denoises the pixels whose stated error is large;
* :class:`CriticCorrection` adds a learned critic's gradient and sends flagged samples back;
* :class:`PriorFusion` falls back on the training data's Wiener filter where the network's x0 estimate is
  measurably worse than it on held-out images;
* :class:`Autoguidance`, :class:`EpsilonScaling`, :class:`ClipX0` change the prediction without the posterior;
* :class:`Recorder` keeps per-step tensors.

Each says which variance it reads and in what units (:mod:`bdiff.sampler_callbacks.variance`). Blending,
adaptive steps and refinement read the epistemic variance in the units of the mean's error: each reduces to its
base sampler where the model states no error (r(t) = 0), by construction, as the fallback does where its
measured weight is 1. The critic reads a learned critic, not the posterior. Order matters and is the order given to the
Sampler; the recommended one is prior fusion -> autoguidance / epsilon scaling / clipping -> blending -> adaptive steps -> refinement -> critic -> recorder. A recipe names each by its class
(:mod:`bdiff.sampling.recipe`).
"""

from bdiff.sampler_callbacks.adaptive import AdaptiveOutput, AdaptiveStepSize
from bdiff.sampler_callbacks.autoguidance import Autoguidance
from bdiff.sampler_callbacks.blend import BlendOutput, VarianceWeightedBlending
from bdiff.sampler_callbacks.clip_x0 import ClipX0
from bdiff.sampler_callbacks.critic import CriticCorrection, CriticOutput
from bdiff.sampler_callbacks.eps_scaling import EpsilonScaling
from bdiff.sampler_callbacks.prior_fusion import PriorFusion
from bdiff.sampler_callbacks.recorder import Recorder, RecorderOutput
from bdiff.sampler_callbacks.refine import RefineOutput, UncertainRegionRefinement

__all__ = [
    "AdaptiveOutput",
    "AdaptiveStepSize",
    "Autoguidance",
    "BlendOutput",
    "ClipX0",
    "CriticCorrection",
    "CriticOutput",
    "EpsilonScaling",
    "PriorFusion",
    "Recorder",
    "RecorderOutput",
    "RefineOutput",
    "UncertainRegionRefinement",
    "VarianceWeightedBlending",
]
