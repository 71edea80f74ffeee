"""``bdiff-sample --nfe N``: the measured-best recipe for a budget, and that it keeps the budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from bdiff.checkpoint import load_model
from bdiff.metrics.samples_file import load_samples
from bdiff.sample import main
from bdiff.sampling.budget import BEST_RECIPES, FEWER_CALLS, recipe_for_budget
from bdiff.sampling.grids import FittedGrid, ScheduleGrid


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fitted grids' costs persist under $BDIFF_CACHE: keep them out of the user's cache."""
    monkeypatch.setenv("BDIFF_CACHE", str(tmp_path_factory.getbasetemp() / "bdiff-cache"))


def test_the_table_has_every_measured_budget_and_no_critic() -> None:
    assert {5, 10, 20} <= set(BEST_RECIPES)
    for budget in BEST_RECIPES:
        recipe = recipe_for_budget(budget)
        assert recipe.steps <= budget and recipe.callbacks == []
    assert recipe_for_budget(7).steps == 7 and isinstance(recipe_for_budget(7).grid, FittedGrid)  # the lower entry, rescaled
    # order 3 to the last step won at 5 calls only (it lost at 3, 4 and 6 and collapses from 7): it runs at 5 alone
    assert recipe_for_budget(5).stepper.order == 3
    assert all(recipe_for_budget(n).stepper.order == 2 for n in (1, 2, 4, 6, 9))
    thirty = recipe_for_budget(30)
    assert thirty.stepper.variant == "bh1" and thirty.steps == 30
    assert isinstance(thirty.grid, ScheduleGrid) and thirty.grid.spacing == "leading"


def test_some_budgets_run_a_shorter_entry_as_it_is() -> None:
    """On the fitted grids FD is not monotone in the steps: at 11, 12, 15, 16 and 19 calls the 10-call entry beat
    itself stretched, so --nfe runs it as it is there."""
    for budget, shorter in FEWER_CALLS.items():
        assert shorter == max(b for b in BEST_RECIPES if b < budget) and budget not in BEST_RECIPES
        assert recipe_for_budget(budget).config == recipe_for_budget(shorter).config
        assert recipe_for_budget(budget).name == f"best-at-{budget}-nfe"
    assert recipe_for_budget(12).steps == 10 and recipe_for_budget(13).steps == 13  # 13 stretches the 10-call entry


@pytest.mark.parametrize("nfe", [1, 2, 4, 5, 7, 10, 12, 13, 20, 30])
def test_the_chosen_recipe_never_spends_more_than_the_budget(last_ckpt: Path, nfe: int) -> None:
    recipe = recipe_for_budget(nfe)
    result = recipe.build(load_model(last_ckpt, num_samples=2)).sample(6, seed=0)
    assert result.images.shape == (6, 1, 8, 8)
    assert int(result.nfe.max()) <= nfe, f"{recipe.config} spent {result.nfe.tolist()} calls at a budget of {nfe}"


def test_sample_with_nfe_writes_samples_made_within_the_budget(last_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.npz"
    main(["--ckpt", str(last_ckpt), "--nfe", "10", "--sampler.posterior_samples", "2", "--n", "5", "--out", str(out)])
    s = load_samples(out)
    assert s.images.shape == (5, 1, 8, 8) and s.nfe <= 10
    assert s.config["recipe_name"] == "best-at-10-nfe" and s.config["recipe"]["posterior_samples"] == 2


def test_a_budget_that_runs_a_shorter_entry_says_so(last_ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "s.npz"
    main(["--ckpt", str(last_ckpt), "--nfe", "12", "--sampler.posterior_samples", "2", "--n", "3", "--out", str(out)])
    s = load_samples(out)
    assert s.config["recipe"]["steps"] == 10 and s.nfe <= 10 and s.config["recipe_name"] == "best-at-12-nfe"
    assert "--nfe 12: the 10-call recipe as it is" in capsys.readouterr().err


def test_nfe_is_refused_with_a_recipe_a_critic_or_below_one(last_ckpt: Path, tmp_path: Path, capsys) -> None:
    for argv in (["--nfe", "10", "--sampler", "configs/sampler/dpmpp.yaml"], [], ["--nfe", "0"],
                 ["--nfe", "10", "--critic", "critic.ckpt"]):
        with pytest.raises(SystemExit) as e:
            main(["--ckpt", str(last_ckpt), *argv, "--out", str(tmp_path / "s.npz")])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "not allowed with a --sampler recipe" in err and "no sampler recipe" in err
    assert "--nfe must be >= 1" in err and "--nfe picks a recipe without a critic" in err
    assert not (tmp_path / "s.npz").exists()
    with pytest.raises(ValueError, match="budget"):
        recipe_for_budget(0)
