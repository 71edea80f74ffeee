"""``bdiff-sample --nfe N``: the measured-best recipe for a budget, and that it keeps the budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from bdiff.checkpoint import load_model
from bdiff.metrics.samples_file import load_samples
from bdiff.sample import main
from bdiff.sampling.budget import BEST_RECIPES, recipe_for_budget


def test_the_table_has_the_measured_budgets_with_and_without_a_critic() -> None:
    assert {5, 10, 20} <= set(BEST_RECIPES)
    for budget, pair in BEST_RECIPES.items():
        assert set(pair) == {"without_critic", "with_critic"}
        assert not any(c.get("name") == "critic" for c in pair["without_critic"].get("callbacks", []))
        assert any(c.get("name") == "critic" for c in pair["with_critic"].get("callbacks", []))
        assert recipe_for_budget(budget).steps <= budget


@pytest.mark.parametrize("nfe", [1, 2, 4, 5, 7, 10, 13, 20, 30])
def test_the_chosen_recipe_never_spends_more_than_the_budget(last_ckpt: Path, nfe: int) -> None:
    recipe = recipe_for_budget(nfe)
    result = recipe.build(load_model(last_ckpt, num_samples=2)).sample(6, seed=0)
    assert result.images.shape == (6, 1, 8, 8)
    assert int(result.nfe.max()) <= nfe, f"{recipe.as_dict()} spent {result.nfe.tolist()} calls at a budget of {nfe}"


@pytest.mark.parametrize("nfe", [3, 5, 10, 20])
def test_the_critic_recipe_keeps_the_budget_too(last_ckpt: Path, critic_run: Path, nfe: int) -> None:
    critic = critic_run / "digits" / "checkpoints" / "last.ckpt"
    recipe = recipe_for_budget(nfe, critic=critic)
    assert any(c["name"] == "critic" and c["critic"] == str(critic) for c in recipe.callbacks)
    result = recipe.build(load_model(last_ckpt, num_samples=2)).sample(6, seed=0)
    assert int(result.nfe.max()) <= nfe


def test_sample_with_nfe_writes_samples_made_within_the_budget(last_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.npz"
    main(["--ckpt", str(last_ckpt), "--nfe", "10", "--n", "5", "--out", str(out)])
    s = load_samples(out)
    assert s.images.shape == (5, 1, 8, 8) and s.nfe <= 10
    assert s.config["recipe"]["name"] == "best-at-10-nfe"


def test_nfe_and_config_are_one_or_the_other(last_ckpt: Path, tmp_path: Path, capsys) -> None:
    for argv in (["--nfe", "10", "--config", "configs/sampler/dpmpp.yaml"], [], ["--nfe", "0"]):
        with pytest.raises(SystemExit) as e:
            main(["--ckpt", str(last_ckpt), *argv, "--out", str(tmp_path / "s.npz")])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "not allowed with" in err and "one of the arguments --config --nfe is required" in err
    assert "--nfe must be >= 1" in err
    with pytest.raises(ValueError, match="budget"):
        recipe_for_budget(0)
