"""Sampler recipes: a YAML file names the stepper, the steps and the sampler callbacks.

Example (``configs/sampler/dpmpp_blend.yaml``)::

    stepper: {name: dpmpp_2m}
    steps: 10
    posterior_samples: 8          # K weight samples per prediction
    callbacks:                    # run in this order at every hook
      - {name: blend, strength: 1.0}

Everything is validated before any sampling starts: unknown keys, unknown
stepper or callback names, non-positive steps/K and bad callback options raise a
ValueError that names the offending entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bdiff.denoiser import Denoiser
from bdiff.sampling.callbacks import AdaptiveStepSize, Recorder, UncertainRegionRefinement, VarianceWeightedBlending
from bdiff.sampling.sampler import Sampler, SamplerCallback
from bdiff.sampling.steppers import STEPPERS, make_stepper

CALLBACKS: dict[str, type[SamplerCallback]] = {
    "blend": VarianceWeightedBlending,
    "adaptive": AdaptiveStepSize,
    "refine": UncertainRegionRefinement,
    "recorder": Recorder,
}


@dataclass
class Recipe:
    """A validated sampler recipe (see module docstring)."""

    stepper: dict[str, Any]
    steps: int
    posterior_samples: int = 8
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    name: str = "recipe"

    @classmethod
    def from_dict(cls, data: dict[str, Any], name: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise ValueError(f"sampler recipe {name!r} must be a mapping, got {type(data).__name__}")
        known = {"stepper", "steps", "posterior_samples", "callbacks"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"sampler recipe {name!r}: unknown key(s) {unknown}; known keys are {sorted(known)}")
        if "stepper" not in data or "steps" not in data:
            raise ValueError(f"sampler recipe {name!r} needs 'stepper' and 'steps'")
        stepper = data["stepper"] if isinstance(data["stepper"], dict) else {"name": data["stepper"]}
        recipe = cls(
            stepper=dict(stepper),
            steps=data["steps"],
            posterior_samples=data.get("posterior_samples", 8),
            callbacks=[dict(c) if isinstance(c, dict) else {"name": c} for c in data.get("callbacks") or []],
            name=name,
        )
        recipe.validate()
        return recipe

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sampler recipe {str(path)!r} does not exist")
        return cls.from_dict(yaml.safe_load(path.read_text()), name=path.stem)

    def validate(self) -> None:
        """Build every part once so bad options fail before any sampling."""
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"sampler recipe {self.name!r}: steps must be an integer >= 1, got {self.steps!r}")
        if not isinstance(self.posterior_samples, int) or self.posterior_samples < 1:
            raise ValueError(
                f"sampler recipe {self.name!r}: posterior_samples (K) must be an integer >= 1, got {self.posterior_samples!r}"
            )
        self.build_stepper()
        self.build_callbacks()

    def build_stepper(self):
        opts = {k: v for k, v in self.stepper.items() if k != "name"}
        name = self.stepper.get("name")
        if name not in STEPPERS:
            raise ValueError(f"sampler recipe {self.name!r}: unknown stepper {name!r}; choose one of {sorted(STEPPERS)}")
        try:
            return make_stepper(name, **opts)
        except TypeError as e:
            raise ValueError(f"sampler recipe {self.name!r}: bad options for stepper {name!r}: {e}") from e

    def build_callbacks(self) -> list[SamplerCallback]:
        out = []
        for spec in self.callbacks:
            name = spec.get("name")
            if name not in CALLBACKS:
                raise ValueError(
                    f"sampler recipe {self.name!r}: unknown callback {name!r}; choose from {sorted(CALLBACKS)}"
                )
            opts = {k: v for k, v in spec.items() if k != "name"}
            try:
                out.append(CALLBACKS[name](**opts))
            except TypeError as e:
                raise ValueError(f"sampler recipe {self.name!r}: bad options for callback {name!r}: {e}") from e
        return out

    def build(self, denoiser: Denoiser) -> Sampler:
        """The Sampler for ``denoiser`` (refuses Bayesian-only callbacks on a deterministic model)."""
        return Sampler(denoiser, self.build_stepper(), self.steps, self.build_callbacks())

    def as_dict(self) -> dict[str, Any]:
        return {"stepper": self.stepper, "steps": self.steps, "posterior_samples": self.posterior_samples,
                "callbacks": self.callbacks, "name": self.name}
