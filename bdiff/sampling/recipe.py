"""Sampler recipes: a stepper on a timestep grid, K weight samples per prediction and sampler callbacks.

A recipe file (``configs/sampler/*.yaml``, ``bdiff-sample --sampler FILE``) holds the arguments of
:class:`Recipe`; jsonargparse (LightningCLI's parser) builds each part from its ``class_path`` and checks
option names and types against the constructors, which check ranges::

    stepper:
      class_path: bdiff.sampling.UniPC
      init_args: {variant: bh1}
    steps: 10
    grid:                          # optional; default ScheduleGrid (trailing)
      class_path: bdiff.sampling.grids.FittedGrid
      init_args: {late_start: false}
    posterior_samples: 8
    callbacks:                     # optional; run in this order at every hook
      - class_path: bdiff.sampler_callbacks.VarianceWeightedBlending
        init_args: {strength: 1.0}

Every bad entry raises before any sampling, naming the key.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Optional

from jsonargparse import ArgumentError, ArgumentParser, Namespace

from bdiff.checks import as_integer
from bdiff.denoiser import Denoiser
from bdiff.sampling.grids import FittedGrid, Grid, ScheduleGrid
from bdiff.sampling.sampler import Sampler, SamplerCallback
from bdiff.sampling.steppers import Stepper

# Every shipped callback, so a recipe may name it by class alone (jsonargparse resolves a short class_path among
# the imported subclasses of the parameter's type).
import bdiff.sampler_callbacks  # noqa: E402, F401


class Recipe:
    """A sampler recipe (module docstring).

    Args:
        stepper: the reverse-process stepper (DDPM, DDIM, DPMSolverPP2M, UniPC).
        steps: grid steps, one denoiser call each without callbacks.
        grid: where the steps lie (default: ScheduleGrid, trailing).
        posterior_samples: K weight samples per prediction.
        callbacks: sampler callbacks, in order.
    """

    def __init__(self, stepper: Optional[Stepper] = None, steps: Optional[int] = None, grid: Optional[Grid] = None,
                 posterior_samples: int = 8, callbacks: Optional[list[SamplerCallback]] = None) -> None:
        if stepper is None or steps is None:  # optional only so that a command line can leave the recipe out
            raise ValueError("a sampler recipe needs a stepper (e.g. bdiff.sampling.UniPC) and steps")
        if not isinstance(stepper, Stepper):
            raise ValueError(f"recipe stepper must be a Stepper, got {type(stepper).__name__}")
        self.stepper, self.steps = stepper, as_integer("recipe steps", steps, 1)
        self.grid = grid if grid is not None else ScheduleGrid()
        self.posterior_samples = as_integer("recipe posterior_samples (K)", posterior_samples, 1)
        self.callbacks = list(callbacks or [])
        self.config: dict[str, Any] = {}
        """The recipe's keys as a recipe file holds them (set by :func:`load_recipe`)."""
        self.name = "recipe"
        """Its file's stem, or the name :func:`load_recipe` was given."""

    @property
    def fitted(self) -> bool:
        """Whether the grid is fitted to the denoiser (:meth:`FittedGrid.fit` costs a minute on 2 CPU cores)."""
        return isinstance(self.grid, FittedGrid)

    def build(self, denoiser: Denoiser) -> Sampler:
        """The Sampler for ``denoiser`` (refuses Bayesian-only callbacks on a deterministic model)."""
        return Sampler(denoiser, self.stepper, self.steps, self.callbacks,
                       timesteps=self.grid.timesteps(denoiser, self.steps))


RECIPE_KEYS = ("stepper", "steps", "grid", "posterior_samples", "callbacks")
"""The keys of a recipe file: :class:`Recipe`'s arguments."""


def add_recipe_arguments(parser: ArgumentParser, key: str = "sampler") -> None:
    """:class:`Recipe`'s arguments as the group ``--<key>`` of ``parser``: ``--sampler FILE`` reads a recipe
    file, ``--sampler.steps 20`` overrides one key."""
    parser.add_class_arguments(Recipe, key, sub_configs=True)


def recipe_given(args: Namespace, key: str = "sampler") -> bool:
    """Whether parsed ``args`` name a recipe (:func:`add_recipe_arguments`): a stepper or steps."""
    return args[key].stepper is not None or args[key].steps is not None


def recipe_parser() -> ArgumentParser:
    """A parser whose ``--recipe`` group holds one recipe's keys (:func:`load_recipe`)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Recipe, "recipe", sub_configs=True)
    return parser


def load_recipe(source: dict[str, Any] | str | Path | Namespace, name: str | None = None) -> Recipe:
    """The :class:`Recipe` a mapping, a recipe file or parsed ``--sampler`` arguments describe; ValueError naming the
    recipe and the bad key, FileNotFoundError for a missing file."""
    label = name or (Path(source).stem if isinstance(source, (str, Path)) else "recipe")
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise FileNotFoundError(f"sampler recipe {str(source)!r} does not exist")
    parser = recipe_parser()
    try:
        if isinstance(source, (str, Path)):
            cfg = parser.parse_args(["--recipe", str(source)])
        else:
            data = _keys(source)
            unknown = sorted(map(str, set(data) - set(RECIPE_KEYS)))
            if unknown:
                raise ValueError(f"unknown key(s) {unknown}; a recipe has {list(RECIPE_KEYS)}")
            cfg = parser.parse_object({"recipe": data})
    except (ArgumentError, TypeError, ValueError) as e:  # names and types, checked by the parser
        raise ValueError(f"sampler recipe {label!r}: {' '.join(str(e).split())}") from e
    try:
        recipe: Recipe = parser.instantiate(cfg).recipe
    except (TypeError, ValueError) as e:  # ranges, checked by the constructors
        message = _failing_part(cfg.recipe) or str(e)
        raise ValueError(f"sampler recipe {label!r}: {' '.join(message.split())}") from e
    recipe.config, recipe.name = _keys(cfg.recipe), label
    return recipe


def _keys(source: dict[str, Any] | Namespace) -> dict[str, Any]:
    """A recipe's keys as a plain mapping, without the config-file path jsonargparse records (``__path__``)."""
    data = source.clone().as_dict() if isinstance(source, Namespace) else dict(source)
    data.pop("__path__", None)
    return data


def _failing_part(recipe: Namespace) -> str:
    """``"<key> (<class>): <its error>"`` for the first part of a parsed recipe whose constructor refuses its
    arguments, else "" (then the recipe's own arguments are at fault)."""
    parts = [("stepper", recipe.stepper), ("grid", recipe.grid)]
    parts += [(f"callbacks[{i}]", spec) for i, spec in enumerate(recipe.callbacks or [])]
    for key, spec in parts:
        if not isinstance(spec, Namespace):
            continue
        module, name = spec.class_path.rsplit(".", 1)
        try:
            getattr(importlib.import_module(module), name)(**(spec.get("init_args") or Namespace()).as_dict())
        except (TypeError, ValueError) as e:
            return f"{key} ({name}): {e}"
    return ""
