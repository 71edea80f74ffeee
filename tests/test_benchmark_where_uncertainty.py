"""``benchmarks/where_uncertainty_pays.py``'s table: each mechanism over the same recipe without it, and the calls it used."""

from __future__ import annotations

import pytest

from tests.conftest import benchmark_module

where = benchmark_module("where_uncertainty_pays")


def test_mechanisms_only_rows_give_each_mechanism_over_its_base() -> None:
    cell = {"regime": "frac10", "train_seed": "1", "seed": 0, "nfe": 10}
    fds = {"base": 2.0, "blend": 2.0, "adaptive": 1.0, "refine": 3.0, "base_more_calls": 4.0}
    rows = [{**cell, "family": name, "digits/fd": fd, "nfe_used": 10.0 + (name == "adaptive")}
            for name, fd in fds.items()]
    (row,) = where.ratios(rows, ["digits"])
    assert row["digits blend/base"] == 1.0
    assert row["digits adaptive/base"] == pytest.approx(0.5)
    assert row["digits refine/base"] == pytest.approx(1.5)
    assert row["digits adaptive/more calls"] == pytest.approx(0.25)
    assert row["adaptive nfe"] == 11.0 and row["refine nfe"] == 10.0
    assert "digits keep/free" not in row  # no --keep families were drawn


def test_every_mechanism_builds_on_the_nfe_recipe() -> None:
    from bdiff.sampling.budget import recipe_for_budget

    for name, (class_path, _) in where.MECHANISMS.items():
        recipe = where.with_mechanism(recipe_for_budget(5), name)
        assert type(recipe.callbacks[-1]).__name__ == class_path
        assert recipe.steps == recipe_for_budget(5).steps


def test_the_photos_benchmark_recipes_use_the_same_mechanism_settings() -> None:
    """``benchmarks/recipes/unipc_leading_*.yaml`` (run by photos_claims.py) add one mechanism each, as MECHANISMS
    sets it, to ``unipc_leading.yaml``."""
    from pathlib import Path

    from bdiff.sampling.recipe import load_recipe

    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "recipes"
    base = load_recipe(folder / "unipc_leading.yaml")
    for name in ("adaptive", "refine"):
        recipe = load_recipe(folder / f"unipc_leading_{name}.yaml")
        expected = where.with_mechanism(base, name)
        assert recipe.config["stepper"] == base.config["stepper"] and recipe.steps == base.steps
        assert vars(recipe.callbacks[-1]) == vars(expected.callbacks[-1])
