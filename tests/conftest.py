"""Shared fixtures: W&B off, small thread count, one tiny trained checkpoint per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


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
