"""What every benchmark shares: where the repository and its results are, how results are written, the references.

Run a benchmark as ``python benchmarks/<name>.py`` (from any folder, with bdiff installed): Python
puts ``benchmarks/`` on the path, so ``from common import ROOT, RESULTS, write_results`` and the
other benchmark modules (``peers``, ``timing``, ``heldout_baselines``) import as they are.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]  # the repository
RESULTS = ROOT / "benchmarks" / "results"  # every claim's numbers, cited by BENCHMARKS.md and docs/


def write_json(path: Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON (anything else as ``str``) to ``path``, creating its folder; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def write_results(out: Path, stem: str, payload: Any, rows: list[dict], columns: list[str]) -> None:
    """Write ``<stem>.json`` (payload) and ``<stem>.md`` (a table of rows) into ``out``; print the table."""
    from bdiff.metrics.report import markdown_table

    write_json(out / f"{stem}.json", payload)
    table = markdown_table(rows, columns)
    (out / f"{stem}.md").write_text(table + "\n")
    print(table)


def references_for(spaces: Sequence[str] | None = None) -> dict[str, tuple[Any, Any]]:
    """:func:`bdiff.metrics.references.references_for` (every digits feature space by default), after training
    any digits classifier missing from the feature cache (:func:`bdiff.lit.feature_module.ensure_feature_nets`)."""
    from bdiff.lit.feature_module import ensure_feature_nets
    from bdiff.metrics.features import DIGITS_SPACES
    from bdiff.metrics.references import references_for as load_references

    spaces = DIGITS_SPACES if spaces is None else spaces
    ensure_feature_nets(spaces)
    return load_references(spaces)


STEPPERS = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp_2m": "DPMSolverPP2M", "unipc": "UniPC"}
CALLBACKS = {"blend": "VarianceWeightedBlending", "adaptive": "AdaptiveStepSize", "refine": "UncertainRegionRefinement",
             "recorder": "Recorder", "critic": "CriticCorrection", "eps_scaling": "EpsilonScaling", "clip_x0": "ClipX0",
             "autoguidance": "Autoguidance"}
"""The benchmarks' short names for steppers and callbacks (``{name: unipc, variant: bh1}``), and their classes."""


def recipe_file(spec: dict[str, Any]) -> dict[str, Any]:
    """A recipe written in the benchmarks' shorthand as a recipe file's contents (:mod:`bdiff.sampling.recipe`).

    Shorthand: ``stepper`` and each callback a short name or ``{name: ..., <option>: ...}``; ``spacing`` one of
    trailing / leading / linspace / karras / fitted, or ``{name: karras, rho: 5}`` / ``{name: fitted, late_start: false}``.
    """

    def part(entry: Any, names: dict[str, str]) -> dict[str, Any]:
        entry = {"name": entry} if isinstance(entry, str) else dict(entry)
        return {"class_path": names[entry.pop("name")], "init_args": entry}

    out = {k: v for k, v in spec.items() if k not in ("stepper", "spacing", "callbacks")}
    out["stepper"] = part(spec["stepper"], STEPPERS)
    if spec.get("callbacks"):
        out["callbacks"] = [part(c, CALLBACKS) for c in spec["callbacks"]]
    if spec.get("spacing") is not None:
        grid = {"name": spec["spacing"]} if isinstance(spec["spacing"], str) else dict(spec["spacing"])
        name = grid.pop("name")
        out["grid"] = ({"class_path": "FittedGrid", "init_args": grid} if name == "fitted"
                       else {"class_path": "ScheduleGrid", "init_args": {"spacing": name, **grid}})
    return out


def short_recipe(spec: dict[str, Any], name: str = "recipe") -> Any:
    """The :class:`~bdiff.sampling.recipe.Recipe` a shorthand spec (:func:`recipe_file`) describes."""
    from bdiff.sampling.recipe import load_recipe

    return load_recipe(recipe_file(spec), name=name)
