"""Sampler recipes and the sampling entry point, on the session's tiny trained checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bdiff.metrics.samples_file import load_samples
from bdiff.sample import main
from bdiff.sampling.recipe import load_recipe
from tests.conftest import CONFIGS, ROOT

RECIPES = sorted((CONFIGS / "sampler").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_sampler_recipe_is_valid(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.steps >= 1 and recipe.stepper is not None and recipe.name == path.stem


def test_sample_writes_a_valid_samples_file_and_png(last_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.npz"
    recipe = tmp_path / "every_callback.yaml"  # every posterior-driven callback, in the documented order
    recipe.write_text("stepper: DPMSolverPP2M\nsteps: 10\nposterior_samples: 8\ncallbacks:\n"
                      "  - VarianceWeightedBlending\n"
                      "  - {class_path: AdaptiveStepSize, init_args: {tol: 0.5, max_extra_nfe: 1}}\n"
                      "  - {class_path: UncertainRegionRefinement, init_args: {tol: 0.5, jump: 50, t_range: [50, 600], "
                      "max_passes: 1}}\n")
    main(["--ckpt", str(last_ckpt), "--sampler", str(recipe), "--n", "12", "--batch-size", "5", "--out", str(out)])
    s = load_samples(out)
    assert s.images.shape == (12, 1, 8, 8) and s.variance is not None and s.variance.shape == s.images.shape
    assert 1 <= s.nfe <= 11 and s.seconds > 0
    assert s.config["recipe"]["callbacks"][0]["class_path"].endswith("VarianceWeightedBlending")
    assert out.with_suffix(".png").stat().st_size > 0


def test_samples_do_not_depend_on_chunking_or_devices(last_ckpt: Path, tmp_path: Path) -> None:
    recipe = str(CONFIGS / "sampler" / "dpmpp.yaml")
    main(["--ckpt", str(last_ckpt), "--sampler", recipe, "--n", "7", "--batch-size", "7", "--out", str(tmp_path / "a.npz")])
    main(["--ckpt", str(last_ckpt), "--sampler", recipe, "--n", "7", "--batch-size", "3", "--out", str(tmp_path / "b.npz")])
    cmd = [sys.executable, "-m", "bdiff.sample", "--ckpt", str(last_ckpt), "--sampler", recipe, "--n", "7",
           "--devices", "2", "--out", str(tmp_path / "c.npz")]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=300)
    a, b, c = (np.load(tmp_path / f"{k}.npz") for k in "abc")
    # Same noise for sample i everywhere; only float rounding of batch-size-dependent kernels differs.
    for other in (b, c):
        np.testing.assert_allclose(a["images"], other["images"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(a["variance"], other["variance"], rtol=1e-3, atol=1e-9)


def _cb(name: str, **init_args: object) -> dict:
    return {"class_path": name, "init_args": init_args}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stepper": "DDIM", "steps": 0}, "steps"),
        ({"stepper": "DDIM", "steps": 5, "posterior_samples": 0}, "posterior_samples"),
        ({"stepper": "Heun", "steps": 5}, "recipe.stepper"),
        ({"stepper": "DDIM", "steps": 5, "callbacks": [_cb("Magic")]}, "recipe.callbacks.*Magic"),
        ({"stepper": "DDIM", "steps": 5, "callbacks": [_cb("AdaptiveStepSize", tol=0)]}, "tol"),
        ({"stepper": "DDIM", "steps": 5, "callbacks": [_cb("AdaptiveStepSize", max_extra_nfe=-1)]}, "max_extra_nfe"),
        ({"stepper": "DDIM", "steps": 5, "callbacks": [_cb("VarianceWeightedBlending", speed=2)]}, "speed"),
        ({"stepper": "DDIM", "steps": 5, "colour": "red"}, "colour"),
        ({"stepper": "DDIM", "steps": 2.5}, "recipe.steps"),
        ({"stepper": "DDIM", "steps": 5, "callbacks": "blend"}, "recipe.callbacks"),
        ({"stepper": "DDIM", "steps": 5, "grid": _cb("ScheduleGrid", spacing="cosine")}, "spacing must be one of"),
        ({"stepper": "DDIM", "steps": 5, "grid": _cb("ScheduleGrid", spacing="karras", rho=0)}, "rho must be"),
        ({"stepper": "DDIM", "steps": 5, "grid": _cb("ScheduleGrid", sigma_max=80)}, "sigma_max"),
        ({"stepper": "DDIM", "steps": 5, "grid": _cb("FittedGrid", rho=7)}, "rho"),
        ({"stepper": "DDIM", "steps": 5, "grid": _cb("FittedGrid", samples=1)}, "samples"),
        ({"stepper": {"class_path": "UniPC", "init_args": {"order": 4}}, "steps": 5}, "order"),
    ],
)
def test_bad_recipes_fail_before_any_work(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_recipe(data)


def test_recipe_grid_reaches_the_sampler_and_round_trips() -> None:
    from bdiff.schedule import karras_timesteps
    from bdiff.schedule import NoiseSchedule

    class Den:
        schedule, image_shape, is_bayesian = NoiseSchedule(), (1, 4, 4), True

    recipe = load_recipe({"stepper": "DPMSolverPP2M", "steps": 6, "grid": _cb("ScheduleGrid", spacing="karras", rho=5)})
    sampler = recipe.build(Den())
    assert sampler.grid.tolist() == karras_timesteps(Den.schedule.alphas_cumprod, 6, 5.0) + [-1]
    again = load_recipe(recipe.config)
    assert again.build(Den()).grid.tolist() == sampler.grid.tolist() and again.config == recipe.config
    default = load_recipe({"stepper": "DDIM", "steps": 4}).build(Den())
    assert default.grid.tolist() == [999, 749, 499, 249, -1]  # trailing unless told otherwise


def test_bayesian_only_callback_refuses_deterministic_model() -> None:
    import torch

    from bdiff.bayes import BayesConfig, BayesianUNet
    from bdiff.bayes.predictive import BayesianDenoiser
    from bdiff.nets import UNet, UNetConfig
    from bdiff.schedule import NoiseSchedule

    den = BayesianDenoiser(BayesianUNet(UNet(UNetConfig(base_channels=8, num_heads=2)), BayesConfig(layers="none")), NoiseSchedule())
    recipe = load_recipe({"stepper": "DDIM", "steps": 3, "callbacks": ["VarianceWeightedBlending"]})
    with pytest.raises(ValueError, match="needs a Bayesian denoiser"):
        recipe.build(den)
    assert torch.isfinite(load_recipe({"stepper": "DDIM", "steps": 3}).build(den).sample(2).images).all()


def test_sample_chunks_cut_the_run_without_changing_any_sample(last_ckpt: Path) -> None:
    import torch

    from bdiff.checkpoint import load_model
    from bdiff.sampling.sampler import chunk_ranges

    sampler = load_recipe(CONFIGS / "sampler" / "dpmpp.yaml").build(load_model(last_ckpt, num_samples=2))
    chunks = list(sampler.sample_chunks(7, 3, seed=4))
    assert [list(r) for r, _ in chunks] == [[0, 1, 2], [3, 4, 5], [6]]
    whole = sampler.sample(7, seed=4)
    # Float rounding only: the CPU convolutions pick kernels by batch size; on an AMD EPYC one pixel of 448
    # differed by 1.02e-5 with weights from today's training code (same model, other rounding).
    torch.testing.assert_close(torch.cat([res.images for _, res in chunks]), whole.images, rtol=0, atol=5e-5)
    with pytest.raises(ValueError, match="batch_size"):
        chunk_ranges(5, 0)


def test_a_printed_job_config_reruns_to_the_same_samples(last_ckpt: Path, tmp_path: Path, capsys) -> None:
    import yaml

    recipe = CONFIGS / "sampler" / "dpmpp.yaml"
    argv = ["--ckpt", str(last_ckpt), "--sampler", str(recipe), "--sampler.steps", "3", "--n", "4",
            "--out", str(tmp_path / "a.npz")]
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--print_config"])
    assert stop.value.code == 0
    job = tmp_path / "job.yaml"
    job.write_text(capsys.readouterr().out)
    assert yaml.safe_load(job.read_text())["sampler"]["steps"] == 3  # an option after --sampler overrides its key
    main(argv)
    main(["--config", str(job), "--out", str(tmp_path / "b.npz")])
    main(["--ckpt", str(last_ckpt), "--sampler.stepper", "DPMSolverPP2M", "--sampler.steps", "3", "--n", "4",
          "--out", str(tmp_path / "c.npz")])
    a, b, c = (load_samples(tmp_path / f"{k}.npz") for k in "abc")
    assert a.config["recipe"]["steps"] == 3 and a.config["recipe_name"] == "dpmpp" and a.nfe == 3
    assert c.config["recipe_name"] == "command-line" and a.config["recipe"] == b.config["recipe"] == c.config["recipe"]
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.images, c.images)


def test_every_bayesian_sample_gets_a_score_and_keep_keeps_the_most_certain(last_ckpt: Path, tmp_path: Path) -> None:
    from bdiff.metrics.usefulness import sample_score

    plain, kept = tmp_path / "plain.npz", tmp_path / "kept.npz"
    common = ["--ckpt", str(last_ckpt), "--sampler.stepper", "DDIM", "--sampler.steps", "3", "--sampler.posterior_samples",
              "2", "--seed", "4"]
    main([*common, "--n", "25", "--batch-size", "10", "--out", str(plain)])
    main([*common, "--n", "20", "--keep", "0.8", "--batch-size", "10", "--out", str(kept)])
    drawn, s = load_samples(plain), load_samples(kept)
    assert drawn.score is not None and drawn.score.shape == (25,) and 0 <= float(drawn.score.min()) <= 1
    assert len(s.images) == 20 and s.config["keep"] == {"kept": 20, "drawn": 25}
    assert s.nfe == pytest.approx(drawn.nfe * 25 / 20)  # calls per kept sample
    # Sample i depends only on (seed, i): the kept file holds the 20 that the score ranks most certain of the 25.
    order = sample_score(drawn.images, drawn.variance).argsort(stable=True)[:20].sort().values
    np.testing.assert_array_equal(s.images.numpy(), drawn.images[order].numpy())


def test_keep_is_refused_outside_0_1(last_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--ckpt", str(last_ckpt), "--nfe", "3", "--keep", "0", "--out", str(tmp_path / "s.npz")])
    assert "--keep must be a fraction in (0, 1]" in capsys.readouterr().err


def test_nfe_with_keep_counts_the_budget_per_kept_sample() -> None:
    from bdiff.sample import parse_args, recipe_of
    from bdiff.sampling.budget import recipe_for_budget

    for nfe, keep, per_drawn in ((10, 0.5, 5), (10, 0.8, 8), (5, 0.5, 2), (1, 0.5, 1)):
        recipe = recipe_of(parse_args(["--ckpt", "x.ckpt", "--nfe", str(nfe), "--keep", str(keep)]))
        assert recipe.config == recipe_for_budget(per_drawn).config, (nfe, keep)
