"""Sampler recipes: a YAML file names the stepper, the steps and the sampler callbacks.

Example (a recipe with a sampler callback)::

    stepper: {name: dpmpp_2m}
    steps: 10
    spacing: trailing             # or leading, linspace, {name: karras, rho: 7}, or fitted (to the
                                  # checkpoint: bdiff.sampling.fitted_grid); optional, default trailing
    posterior_samples: 8          # K weight samples per prediction
    callbacks:                    # run in this order at every hook
      - {name: blend, strength: 1.0}

Everything is validated before any sampling starts: unknown keys, unknown
stepper or callback names, non-positive steps/K and bad callback options raise a
ValueError that names the offending entry. Stepper and callback options are checked
against their constructors' type hints by jsonargparse (LightningCLI's parser).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from jsonargparse import ArgumentError, ArgumentParser, Namespace

from bdiff.checks import as_integer
from bdiff.denoiser import Denoiser
from bdiff.sampling.autoguidance import Autoguidance
from bdiff.sampling.callbacks import AdaptiveStepSize, Recorder, UncertainRegionRefinement, VarianceWeightedBlending
from bdiff.sampling.critic import CriticCorrection
from bdiff.sampling.clip_x0 import ClipX0
from bdiff.sampling.eps_scaling import EpsilonScaling
from bdiff.sampling.fitted_grid import fitted_timesteps
from bdiff.sampling.sampler import Sampler, SamplerCallback
from bdiff.sampling.steppers import STEPPERS, Stepper
from bdiff.schedule import SPACINGS, check_rho

CALLBACKS: dict[str, type[SamplerCallback]] = {
    "blend": VarianceWeightedBlending,
    "adaptive": AdaptiveStepSize,
    "refine": UncertainRegionRefinement,
    "recorder": Recorder,
    "critic": CriticCorrection,
    "eps_scaling": EpsilonScaling,
    "clip_x0": ClipX0,
    "autoguidance": Autoguidance,
}
RECIPE_SPACINGS = (*SPACINGS, "fitted")
"""Grid names a recipe takes: the schedule's fixed grids and one fitted to the denoiser (:mod:`bdiff.sampling.fitted_grid`)."""
FITTED_DEFAULTS: dict[str, Any] = {"late_start": True, "samples": 256, "stride": 10}
"""Options of ``spacing: {name: fitted, ...}`` and their defaults (:func:`~bdiff.sampling.fitted_grid.fitted_timesteps`)."""
RECIPE_DEFAULTS: dict[str, Any] = {"stepper": None, "steps": None, "spacing": None, "posterior_samples": 8, "callbacks": []}
"""A recipe file's keys and their values when absent (``stepper`` and ``steps`` have none: they are required)."""


def add_recipe_arguments(parser: ArgumentParser) -> None:
    """The recipe's keys as top-level options of ``parser``, so a recipe YAML is a ``--config`` of it (``bdiff.sample``).

    jsonargparse checks their types; :meth:`Recipe.from_dict` checks the rest.
    """
    group = parser.add_argument_group("sampler recipe", "the keys of a recipe file (configs/sampler/*.yaml)")
    entry = Optional[Union[dict[str, Any], str]]
    group.add_argument("--stepper", type=entry, default=None,
                       help=f"one of {sorted(STEPPERS)}, or a mapping {{name: ..., <option>: ...}}")
    group.add_argument("--steps", type=Optional[int], default=None, help="grid steps (denoiser calls without callbacks)")
    group.add_argument("--spacing", type=entry, default=None,
                       help=f"the grid: one of {list(RECIPE_SPACINGS)} (default trailing), or {{name: karras, rho: 7}}, "
                            "or {name: fitted, late_start: true, samples: 256, stride: 10}")
    group.add_argument("--posterior_samples", type=int, default=8, help="K weight samples per prediction")
    group.add_argument("--callbacks", type=list[Union[dict[str, Any], str]], default=[],
                       help=f"sampler callbacks in order, each a name or {{name: ..., <option>: ...}}: {sorted(CALLBACKS)}")


def recipe_keys_given(args: Namespace) -> list[str]:
    """The recipe keys of parsed ``args`` (:func:`add_recipe_arguments`) that differ from their defaults."""
    return [k for k, default in RECIPE_DEFAULTS.items() if args[k] != default]


@dataclass
class Recipe:
    """A validated sampler recipe (see module docstring)."""

    stepper: dict[str, Any]
    steps: int
    posterior_samples: int = 8
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    name: str = "recipe"
    spacing: dict[str, Any] = field(default_factory=lambda: {"name": "trailing"})

    @classmethod
    def from_dict(cls, data: dict[str, Any], name: str = "recipe") -> Recipe:
        """The recipe a mapping of recipe keys describes; ValueError naming the recipe and the bad key."""
        if not isinstance(data, dict):
            raise ValueError(f"sampler recipe {name!r} must be a mapping, got {type(data).__name__}")
        unknown = sorted((k for k in data if k not in RECIPE_DEFAULTS), key=str)
        if unknown:
            raise ValueError(f"sampler recipe {name!r}: unknown key(s) {unknown}; known keys are {list(RECIPE_DEFAULTS)}")
        parser = ArgumentParser(exit_on_error=False)
        add_recipe_arguments(parser)
        try:
            args = parser.parse_object(data)  # the keys' types
        except ArgumentError as e:
            raise ValueError(f"sampler recipe {name!r}: {' '.join(str(e).split())}") from e
        if args.stepper is None or args.steps is None:
            raise ValueError(f"sampler recipe {name!r} needs 'stepper' and 'steps'")
        recipe = cls(stepper=_entry(args.stepper), steps=args.steps, posterior_samples=args.posterior_samples,
                     callbacks=[_entry(c) for c in args.callbacks or []], name=name,
                     spacing=_entry(args.spacing or "trailing"))  # null: the default, as for callbacks
        recipe.validate()
        return recipe

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sampler recipe {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"sampler recipe {str(path)!r} is not valid YAML ({str(e).splitlines()[0]})") from e
        return cls.from_dict(data, name=path.stem)

    def validate(self) -> None:
        """Build every part once so bad options fail before any sampling."""
        as_integer(f"sampler recipe {self.name!r}: steps", self.steps, 1)
        as_integer(f"sampler recipe {self.name!r}: posterior_samples (K)", self.posterior_samples, 1)
        self.spacing_options()
        self.build_stepper()
        self.build_callbacks()

    def spacing_options(self) -> dict[str, Any]:
        """The Sampler's ``spacing``/``rho`` keyword arguments from the recipe's ``spacing`` entry; for
        ``fitted``, ``{"spacing": "fitted", "fitted": <fitted_timesteps options>}`` (:meth:`build` fits it)."""
        name = self.spacing.get("name")
        if not isinstance(name, str) or name not in RECIPE_SPACINGS:
            raise ValueError(f"sampler recipe {self.name!r}: unknown spacing {name!r}; choose one of {list(RECIPE_SPACINGS)}")
        opts = {k: v for k, v in self.spacing.items() if k != "name"}
        allowed = {"rho"} if name == "karras" else set(FITTED_DEFAULTS) if name == "fitted" else set()
        unknown = sorted(set(opts) - allowed, key=str)
        if unknown:
            raise ValueError(f"sampler recipe {self.name!r}: unknown option(s) {unknown} for spacing {name!r}")
        if name == "fitted":
            fitted = {**FITTED_DEFAULTS, **opts}
            if not isinstance(fitted["late_start"], bool):
                raise ValueError(f"sampler recipe {self.name!r}: spacing fitted: late_start must be true or false, "
                                 f"got {fitted['late_start']!r}")
            for key in ("samples", "stride"):
                as_integer(f"sampler recipe {self.name!r}: spacing fitted: {key}", fitted[key], 2)
            return {"spacing": name, "fitted": fitted}
        try:
            rho = check_rho(opts.get("rho", 7.0))
        except ValueError as e:
            raise ValueError(f"sampler recipe {self.name!r}: spacing {e}") from e
        return {"spacing": name, "rho": rho}

    def build_stepper(self) -> Stepper:
        """The recipe's stepper (ValueError naming a bad name or option)."""
        return self._construct("stepper", STEPPERS, self.stepper)

    def build_callbacks(self) -> list[SamplerCallback]:
        """The recipe's sampler callbacks, in order (ValueError naming a bad name or option)."""
        return [self._construct("callback", CALLBACKS, spec) for spec in self.callbacks]

    def _construct(self, kind: str, registry: dict[str, type], spec: dict[str, Any]) -> Any:
        """``registry[spec["name"]](**options)`` after jsonargparse (as in LightningCLI) checked the options'
        names and types against the constructor's type hints; the constructor checks their ranges
        (:func:`bdiff.checks.as_number` also refuses inf/nan, which the float type admits)."""
        name, opts = spec.get("name"), {k: v for k, v in spec.items() if k != "name"}
        if not isinstance(name, str) or name not in registry:
            raise ValueError(f"sampler recipe {self.name!r}: unknown {kind} {name!r}; choose one of {sorted(registry)}")
        what = f"sampler recipe {self.name!r}: bad options for {kind} {name!r}"
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(registry[name], fail_untyped=False)
        try:
            parser.parse_object(opts)
        except ArgumentError as e:
            raise ValueError(f"{what}: {' '.join(str(e).split())}") from e
        try:
            return registry[name](**opts)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what}: {e}") from e

    def build(self, denoiser: Denoiser) -> Sampler:
        """The Sampler for ``denoiser`` (refuses Bayesian-only callbacks on a deterministic model)."""
        grid = self.spacing_options()
        if grid["spacing"] == "fitted":
            grid = {"timesteps": fitted_timesteps(denoiser, self.steps, **grid["fitted"])}
        return Sampler(denoiser, self.build_stepper(), self.steps, self.build_callbacks(), **grid)

    def with_critic(self, path: str | Path) -> Recipe:
        """The same recipe with its critic callback reading ``path`` (ValueError if it has none)."""
        if not any(c.get("name") == "critic" for c in self.callbacks):
            raise ValueError(f"sampler recipe {self.name!r} has no critic callback for --critic to set")
        callbacks = [dict(c, critic=str(path)) if c.get("name") == "critic" else dict(c) for c in self.callbacks]
        data = {k: v for k, v in self.as_dict().items() if k != "name"}
        return Recipe.from_dict({**data, "callbacks": callbacks}, name=self.name)

    def as_dict(self) -> dict[str, Any]:
        return {"stepper": self.stepper, "steps": self.steps, "spacing": self.spacing,
                "posterior_samples": self.posterior_samples, "callbacks": self.callbacks, "name": self.name}


def _entry(value: dict[str, Any] | str) -> dict[str, Any]:
    """A stepper, spacing or callback entry as a mapping: ``unipc`` -> ``{name: unipc}``."""
    return dict(value) if isinstance(value, dict) else {"name": value}
