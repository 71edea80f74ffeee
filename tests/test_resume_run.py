"""A fit resumed with ``--ckpt_path`` continues its own run folder and W&B run (bdiff.lit.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from bdiff.lit.callbacks import WANDB_RUN_ID_KEY
from bdiff.lit.cli import checkpoint_run_id, main
from tests.conftest import CONFIGS, cli_args


class Crash(Exception):
    pass


class CrashAtStep(pl.Callback):
    """Test-only: the run dies (an exception out of ``fit``) at the start of the batch after ``step`` steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"killed at step {self.step}")


def test_resumed_fit_continues_the_run_folder_and_the_offline_wandb_run(tmp_path: Path, monkeypatch, caplog) -> None:
    """The run dies at step 7 (5 steps per epoch on two digit classes: ``last.ckpt`` is from step 5); the fit
    resumed from that checkpoint writes into the same run folder and continues the same (offline) W&B run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    small = "--data.init_args.exclude_classes=[2, 3, 4, 5, 6, 7, 8, 9]"  # 324 training images
    crash = '--trainer.callbacks+={"class_path": "tests.test_resume_run.CrashAtStep", "init_args": {"step": 7}}'
    with pytest.raises(Crash):
        main(CONFIGS / "debug.yaml", cli_args(tmp_path, small, "--trainer.max_steps=8", crash))
    import wandb

    wandb.finish()  # the dead process's W&B run ends with it; here, by hand (else the next logger reuses it)
    runs = tmp_path / "bdiff-debug"
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    last = run / "checkpoints" / "last.ckpt"
    first = torch.load(last, weights_only=True)
    assert first["global_step"] == 5 and first[WANDB_RUN_ID_KEY] == run.name

    with caplog.at_level("INFO"):
        cli = main(CONFIGS / "debug.yaml", cli_args(tmp_path, small, "--trainer.max_steps=8", f"--ckpt_path={last}"))
    assert f"Resuming W&B run {run.name} (recorded in the checkpoint)" in caplog.text
    logger = cli.trainer.logger
    assert logger.version == run.name and logger.experiment.id == run.name
    assert [p for p in runs.iterdir() if p.is_dir()] == [run]  # no second run folder
    assert Path(cli.trainer.checkpoint_callback.last_model_path) == last
    assert torch.load(last, weights_only=True)["global_step"] == 8
    assert (run / "samples" / "final.png").is_file()
    assert f"id: {run.name}" in (run / "config.yaml").read_text()  # the resumed part's config names its run
    # Offline, W&B keeps each part in its own folder under the one id; `wandb sync` uploads them as one run.
    parts = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(parts) == 2 and all(p.endswith(f"-{run.name}") for p in parts)


def test_run_id_comes_from_the_checkpoint_else_from_its_folder(tmp_path: Path) -> None:
    recorded = tmp_path / "elsewhere.ckpt"
    torch.save({"global_step": 3, WANDB_RUN_ID_KEY: "abc123"}, recorded)
    assert checkpoint_run_id(recorded, "bdiff") == ("abc123", "recorded in the checkpoint")

    layout = tmp_path / "runs" / "bdiff" / "xyz789" / "checkpoints" / "last.ckpt"  # Lightning's W&B layout
    layout.parent.mkdir(parents=True)
    torch.save({"global_step": 3}, layout)
    assert checkpoint_run_id(layout, "bdiff") == ("xyz789", "from its folder name")
    assert checkpoint_run_id(layout, "other-project")[0] is None

    loose = tmp_path / "last.ckpt"
    torch.save({"global_step": 3}, loose)
    run_id, why = checkpoint_run_id(loose, "bdiff")
    assert run_id is None and "records no W&B run id" in why

    # unreadable here (corrupt, or pickled objects weights-only loading refuses): the folder still names the
    # run, and Lightning's own load decides whether the file resumes at all
    junk = tmp_path / "runs" / "bdiff" / "jun456" / "checkpoints" / "junk.ckpt"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"not a checkpoint")
    assert checkpoint_run_id(junk, "bdiff") == ("jun456", "from its folder name")


def test_an_explicit_logger_id_wins_and_a_checkpoint_without_one_says_so(tmp_path: Path) -> None:
    """Which id the logger is given, from parsing alone (nothing is built or trained)."""
    from bdiff.lit.cli import BdiffCLI
    from bdiff.lit.data import ImageDataModule
    from bdiff.lit.module import DiffusionModule

    class ParseOnly(BdiffCLI):
        def instantiate_classes(self) -> None:
            pass

        def _run_subcommand(self, subcommand: str) -> None:
            pass

    def logger_id(ckpt: Path, *extra: str) -> str | None:
        cli = ParseOnly(DiffusionModule, ImageDataModule, subclass_mode_data=True,
                        args=cli_args(tmp_path, f"--ckpt_path={ckpt}", *extra))
        return cli.config["fit"]["trainer"]["logger"]["init_args"]["id"]

    recorded, loose = tmp_path / "recorded.ckpt", tmp_path / "loose.ckpt"
    torch.save({"global_step": 3, WANDB_RUN_ID_KEY: "abc123"}, recorded)
    torch.save({"global_step": 3}, loose)
    assert logger_id(recorded) == "abc123"
    assert logger_id(recorded, "--trainer.logger.init_args.id=mine") == "mine"
    with pytest.warns(UserWarning, match="starts a new W&B run"):
        assert logger_id(loose) is None
