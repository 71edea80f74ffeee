"""Command line: ``LightningCLI`` over :class:`DiffusionModule` and the image datamodules.

LightningCLI gives type-checked YAML configs (an unknown key or a wrong type is
an error naming the key and the expected type), ``--print_config``, and the
``fit`` / ``validate`` subcommands, with Lightning's Trainer flags for free.
``python train.py`` with no subcommand means ``fit``; with no ``--config`` the
default config (bundled digits) is used.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from bdiff.lit.callbacks import run_dir
from bdiff.lit.checkpoint_io import AtomicCheckpointIO
from bdiff.lit.data import ImageDataModule
from bdiff.lit.module import DiffusionModule

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class SaveConfigToRun(SaveConfigCallback):
    """Write the full resolved config to ``<run dir>/config.yaml`` and log it to every logger."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pass  # the run folder is known only once ModelCheckpoint has resolved its dirpath

    @rank_zero_only
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.already_saved:
            return
        out = run_dir(trainer) / "config.yaml"
        out.parent.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, out, skip_none=False, overwrite=True, multifile=False)
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": self.config.as_dict()})
        self.already_saved = True


def has_fast_bf16(accelerator: str) -> bool:
    """Whether the device a run with this ``trainer.accelerator`` lands on has bf16 kernels.

    CUDA: ``torch.cuda.is_bf16_supported()``. CPU: oneDNN's bf16 kernels (AVX-512 or newer, or Arm's
    bf16 extension); without them torch emulates bf16 and mixed precision is slower than full.
    """
    if accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if accelerator not in ("cpu", "auto"):
        return True  # another accelerator: Lightning checks its own support
    # torch has no public query for this; its own tests and inductor call the same op.
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and torch.backends.mkldnn.is_available() and check())


class BdiffCLI(LightningCLI):
    """LightningCLI that always writes checkpoints atomically (see :mod:`bdiff.lit.checkpoint_io`) and
    runs ``trainer.precision: bf16-mixed`` in full precision where the device has no bf16 kernels."""

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        cfg = self.config_init[self.subcommand]["trainer"] if self.subcommand else self.config_init["trainer"]
        if str(cfg.get("precision")) == "bf16-mixed" and not has_fast_bf16(str(cfg.get("accelerator", "auto"))):
            rank_zero_warn("trainer.precision bf16-mixed: this device has no bf16 kernels (torch would emulate them, "
                           "slower than full precision), so this run uses 32-true")
            cfg["precision"] = "32-true"
        plugins = cfg.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        cfg["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)


def with_defaults(argv: Sequence[str], default_config: str | Path) -> list[str]:
    """Insert ``fit`` when no subcommand is given and the default config when no ``--config`` is."""
    args = list(argv)
    if not args or args[0] not in SUBCOMMANDS:
        if any(a in ("-h", "--help") for a in args[:1]):
            return args
        args = ["fit", *args]
    if not any(a in ("-c", "--config") or a.startswith("--config=") for a in args):
        args[1:1] = ["--config", str(default_config)]
    return args


def main(default_config: str | Path, argv: Sequence[str] | None = None, run: bool = True) -> BdiffCLI:
    """Entry point used by ``train.py``."""
    args = with_defaults(sys.argv[1:] if argv is None else argv, default_config)
    if argv is None:  # run from the shell: LightningCLI reads sys.argv (and warns if given both)
        sys.argv[1:] = args
    return BdiffCLI(
        DiffusionModule,
        ImageDataModule,
        subclass_mode_data=True,
        save_config_callback=SaveConfigToRun,
        args=None if argv is None else args,
        run=run,
        parser_kwargs={"fit": {"description": "Train a Bayesian diffusion model."}},
    )
