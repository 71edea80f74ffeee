"""Shared fixtures: W&B off, small thread count, one tiny trained checkpoint per session."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
BENCHMARKS = ROOT / "benchmarks"


def benchmark_module(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (or the package ``benchmarks/<name>/``) as ``python benchmarks/<script>.py``
    sees it: with ``benchmarks/`` first on the path, so its own imports (``common``, ``peers``, ...) resolve."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


def cli_args(run_dir: Path, *extra: str, config: str = "debug.yaml") -> list[str]:
    """Arguments for a debug training run whose outputs all land in ``run_dir``."""
    return [
        "fit",
        "--config",
        str(CONFIGS / config),
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.logger.init_args.save_dir={run_dir}",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A tiny model trained for 30 steps through the real CLI; returns the LightningCLI object."""
    from bdiff.lit.cli import main

    run_dir = tmp_path_factory.mktemp("run")
    cli = main(CONFIGS / "digits.yaml", cli_args(run_dir))
    return cli


@pytest.fixture(scope="session")
def last_ckpt(trained) -> Path:
    path = Path(trained.trainer.checkpoint_callback.last_model_path)
    assert path.is_file()
    return path


@pytest.fixture(scope="session")
def critic_run(last_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train a tiny critic against the session's tiny diffusion checkpoint through the real CLI."""
    from bdiff.lit.critic_module import main

    run = tmp_path_factory.mktemp("critic")
    recipe = run / "fast.yaml"
    recipe.write_text("stepper: DDIM\nsteps: 3\nposterior_samples: 2\n")
    cwd = os.getcwd()
    os.chdir(run)  # the config's relative paths (runs/critic/...) land in the temp dir
    try:
        main([
            "fit", "--config", str(CONFIGS / "critic" / "digits.yaml"),
            f"--data.diffusion_ckpt={last_ckpt}", f"--data.sampler={recipe}",
            "--trainer.max_epochs=2", "--trainer.check_val_every_n_epoch=1", "--trainer.enable_progress_bar=false",
            "--model.critic.width=8",
        ])
    finally:
        os.chdir(cwd)
    return run / "runs" / "critic"
