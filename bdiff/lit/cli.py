"""Command line: ``LightningCLI`` over :class:`DiffusionModule` and the image datamodules.

LightningCLI gives type-checked YAML configs (an unknown key or a wrong type is
an error naming the key and the expected type), ``--print_config``, and the
``fit`` / ``validate`` subcommands, with Lightning's Trainer flags for free.
``python train.py`` with no subcommand means ``fit``; with no ``--config`` the
default config (bundled digits) is used.

Defaults live in the code, once: the model's measured-best settings are the defaults of
:class:`~bdiff.lit.module.DiffusionModule` and :class:`~bdiff.bayes.BayesConfig`, the
trainer's (``precision: bf16-mixed``) are :data:`TRAINER_DEFAULTS`; the YAMLs under
``configs/`` hold only what is specific to their data (network shape, steps, data, callbacks).

``fit --ckpt_path <save_dir>/<project>/<id>/checkpoints/<name>.ckpt`` continues that run: the
W&B logger gets the run id the checkpoint records (:class:`~bdiff.lit.callbacks.ExactResume`),
or else the one its folder is named after, so checkpoints, sample grids and ``config.yaml`` go
to the same run folder and the same W&B run continues (``resume="allow"``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from bdiff.console import OneLineErrors
from bdiff.lit.callbacks import WANDB_RUN_ID_KEY, FinalValidation, run_dir
from bdiff.lit.checkpoint_io import AtomicCheckpointIO
from bdiff.lit.data import ImageDataModule
from bdiff.lit.module import DiffusionModule

SUBCOMMANDS = ("fit", "validate", "test", "predict")

#: Trainer settings every diffusion config inherits (``trainer_defaults`` of LightningCLI): bf16
#: autocast with fp32 weights, ~20% off a digits step on 2 CPU cores (BENCHMARKS.md, "Training
#: time"); :class:`BdiffCLI` runs 32-true where the device has no bf16 kernels.
TRAINER_DEFAULTS: dict[str, Any] = {"precision": "bf16-mixed"}


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

    CUDA: ``torch.cuda.is_bf16_supported`` not counting emulation (GPUs older than Ampere emulate it).
    CPU: oneDNN's bf16 kernels (AVX-512 or newer, or Arm's bf16 extension). Without them torch
    emulates bf16 and mixed precision is slower than full.
    """
    if accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if accelerator not in ("cpu", "auto"):
        return True  # another accelerator: Lightning checks its own support
    # torch has no public query for this; its own tests and inductor call the same op.
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and torch.backends.mkldnn.is_available() and check())


def _class(class_path: str) -> type | None:
    """The class a config's ``class_path`` names, None if it cannot be imported."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def checkpoint_run_id(ckpt_path: str | Path, project: str | None) -> tuple[str | None, str]:
    """The W&B run id a checkpoint belongs to, and where it was found (for the one-line message).

    First the id :class:`~bdiff.lit.callbacks.ExactResume` stores in every checkpoint, else the
    folder layout of Lightning's ``ModelCheckpoint`` under a W&B logger,
    ``<save_dir>/<project>/<id>/checkpoints/<name>.ckpt``; ``(None, why)`` when neither gives one.
    """
    path = Path(ckpt_path)
    try:
        try:  # memory-mapped: only the small entries are read
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (non-zip) file cannot be mapped
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # corrupt, or pickled objects weights-only loading refuses: Lightning's own load decides
        ckpt = None
    run_id = ckpt.get(WANDB_RUN_ID_KEY) if isinstance(ckpt, dict) else None
    if isinstance(run_id, str) and run_id:
        return run_id, "recorded in the checkpoint"
    parts = path.resolve().parts
    if len(parts) >= 4 and parts[-2] == "checkpoints" and (project is None or parts[-4] == project):
        return parts[-3], "from its folder name"
    return None, (f"it records no W&B run id and is not in a <save_dir>/{project or '<project>'}/<id>/checkpoints/ "
                  "folder")


class BdiffArgumentParser(OneLineErrors, LightningArgumentParser):
    """LightningCLI's parser; a bad option ends in one line and exit status 2 (:class:`bdiff.console.OneLineErrors`)."""


class BdiffCLI(LightningCLI):
    """LightningCLI that always writes checkpoints atomically (see :mod:`bdiff.lit.checkpoint_io`), runs
    ``trainer.precision: bf16-mixed`` in full precision where the device has no bf16 kernels, validates
    after the last step (:class:`~bdiff.lit.callbacks.FinalValidation`), continues the checkpoint's
    run folder and W&B run when ``fit`` resumes with ``--ckpt_path``, and reports a bad option in one line
    (:class:`BdiffArgumentParser`)."""

    def __init__(self, *args: Any, parser_class: type[LightningArgumentParser] = BdiffArgumentParser, **kwargs: Any) -> None:
        super().__init__(*args, parser_class=parser_class, **kwargs)

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit":
            self._continue_run(self.config["fit"])

    def _continue_run(self, config: Any) -> None:
        """Give the W&B logger the run id of ``ckpt_path``'s run, unless it was given an id of its own."""
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or not Path(str(ckpt_path)).is_file():
            return  # no resume, or "last"/"hpc"/a missing file: Lightning resolves or refuses those itself
        loggers = config["trainer"].get("logger")
        loggers = loggers if isinstance(loggers, list) else [loggers]
        for logger in loggers:
            cls = _class(str(getattr(logger, "class_path", "")))
            if cls is None or not issubclass(cls, WandbLogger):
                continue
            args = logger.get("init_args")
            if args is None or args.get("id") or args.get("version"):
                return  # an explicit id wins
            project = args.get("project")
            run_id, where = checkpoint_run_id(str(ckpt_path), project)
            if run_id is None:
                rank_zero_warn(f"--ckpt_path {ckpt_path}: {where}, so this fit starts a new W&B run (and a new run "
                               "folder where ModelCheckpoint names no dirpath); give --trainer.logger.init_args.id=<id> "
                               "to continue one")
                return
            args["id"] = run_id
            folder = Path(str(args.get("save_dir") or config["trainer"].get("default_root_dir") or "."))
            rank_zero_info(f"Resuming W&B run {run_id} ({where}): checkpoints, samples and config.yaml continue in "
                           f"{folder / str(project) / run_id}")
            return

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
        callbacks = cfg.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        if not any(isinstance(c, FinalValidation) for c in callbacks):
            callbacks.append(FinalValidation())
        cfg["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


def with_subcommand(argv: Sequence[str]) -> list[str]:
    """Insert ``fit`` when no subcommand is given (``--help`` first asks for the list of subcommands)."""
    args = list(argv)
    if args[:1] and (args[0] in SUBCOMMANDS or args[0] in ("-h", "--help")):
        return args
    return ["fit", *args]


def with_defaults(argv: Sequence[str], default_config: str | Path) -> list[str]:
    """Insert ``fit`` when no subcommand is given and the default config when no ``--config`` is."""
    args = with_subcommand(argv)
    if args[0] in SUBCOMMANDS and not any(a in ("-c", "--config") or a.startswith("--config=") for a in args):
        args[1:1] = ["--config", str(default_config)]
    return args


def cli_args(argv: Sequence[str] | None, args: list[str]) -> list[str] | None:
    """LightningCLI's ``args`` for a command line ``args`` made from ``argv``: from the shell (``argv`` None),
    None after writing ``args`` to ``sys.argv`` (LightningCLI reads it then, and warns if given both)."""
    if argv is None:
        sys.argv[1:] = args
        return None
    return args


class _ParseOnly(BdiffCLI):
    """Parses and checks a config like ``train.py``; builds nothing and seeds nothing."""

    def _set_seed(self) -> None:  # LightningCLI's: seed_everything would reseed this process
        pass

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def resolved_config(config: str | Path, *overrides: str) -> dict[str, Any]:
    """The run ``train.py fit --config <config> <overrides>`` would start, as plain data with every default
    filled in (what ``--print_config`` prints and a run's ``config.yaml`` holds); nothing is built.

    Example:
        >>> resolved_config("configs/digits.yaml")["model"]["bayes"]["objective"]
        'hybrid'
    """
    import yaml

    cli = _ParseOnly(DiffusionModule, ImageDataModule, subclass_mode_data=True, save_config_callback=None,
                     trainer_defaults=TRAINER_DEFAULTS, args=["--config", str(config), *overrides], run=False)
    return yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))


def main(default_config: str | Path, argv: Sequence[str] | None = None, run: bool = True) -> BdiffCLI:
    """Entry point used by ``train.py``."""
    args = with_defaults(sys.argv[1:] if argv is None else argv, default_config)
    return BdiffCLI(
        DiffusionModule,
        ImageDataModule,
        subclass_mode_data=True,
        save_config_callback=SaveConfigToRun,
        trainer_defaults=TRAINER_DEFAULTS,
        args=cli_args(argv, args),
        run=run,
        parser_kwargs={"fit": {"description": "Train a Bayesian diffusion model."}},
    )
