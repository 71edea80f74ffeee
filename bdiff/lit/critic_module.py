"""Training the time-conditioned critic (Discriminator Guidance, Kim et al., ICML 2023).

    python -m bdiff.lit.critic_module fit --config configs/critic/digits.yaml \\
        --data.diffusion_ckpt runs/bdiff/<id>/checkpoints/last.ckpt

``fit`` is the default subcommand (as for train.py); ``fit --print_config`` prints every option.

Each step draws t ~ U{0..T-1} per image and x_t ~ q(x_t | x0) with the diffusion model's own
schedule (read from the diffusion checkpoint), then minimises binary cross-entropy between
real (1) and generated (0) x_t. Validation reports accuracy and AUROC at fixed t, so the
critic's power per noise level is visible in W&B; the checkpoint carries the critic's config
and the schedule as plain data and loads weights-only (:func:`bdiff.critic.load_critic`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import BinaryAUROC

from bdiff.console import exit_on_user_error
from bdiff.critic.net import CriticConfig, CriticNet
from bdiff.lit.critic_data import CriticDataModule
from bdiff.schedule import NoiseSchedule

VAL_TIMESTEPS = (0, 100, 300, 600, 900)


class CriticModule(pl.LightningModule):
    """BCE training of :class:`~bdiff.critic.CriticNet` on real vs generated x_t (see module docstring).

    Args:
        critic: shape of the critic network (must match the data's image size and channels).
        lr: AdamW peak learning rate (cosine decay to 0 over the run).
        weight_decay: AdamW weight decay.
        t_max: train on t in [0, t_max] only (default: all of the schedule).
    """

    def __init__(
        self, critic: CriticConfig = CriticConfig(), lr: float = 2e-3, weight_decay: float = 1e-2, t_max: int | None = None
    ) -> None:
        super().__init__()
        critic = CriticConfig(**critic) if isinstance(critic, dict) else critic
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"critic needs lr > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
        if t_max is not None and t_max < 0:
            raise ValueError(f"critic t_max must be >= 0, got {t_max}")
        # Plain dicts, so the checkpoint loads with torch.load(weights_only=True). The schedule is
        # filled in from the diffusion checkpoint in setup().
        self.save_hyperparameters({"critic": asdict(critic), "lr": lr, "weight_decay": weight_decay, "t_max": t_max,
                                   "schedule": None, "diffusion_ckpt": None, "fakes_per_real": None})
        self.net = CriticNet(critic)
        self.schedule: NoiseSchedule | None = None
        self.val_auroc = torch.nn.ModuleDict({f"t{t}": BinaryAUROC() for t in VAL_TIMESTEPS})

    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if not isinstance(data, CriticDataModule):
            raise ValueError("CriticModule trains with a CriticDataModule (it knows the diffusion model's schedule)")
        cfg = self.net.config
        if (data.channels, data.image_size) != (cfg.in_channels, cfg.image_size):
            raise ValueError(
                f"the data gives {data.channels}x{data.image_size}x{data.image_size} images but model.critic expects "
                f"{cfg.in_channels}x{cfg.image_size}x{cfg.image_size}: set model.critic.in_channels={data.channels} "
                f"and model.critic.image_size={data.image_size}"
            )
        self.hparams["schedule"] = asdict(data.schedule_config)
        self.hparams["diffusion_ckpt"] = str(data.diffusion_ckpt)
        self.hparams["fakes_per_real"] = data.fakes_per_real  # load_critic adds log k back to the logit
        self.schedule = NoiseSchedule(**asdict(data.schedule_config)).to(self.device)
        if self.hparams["t_max"] is not None and self.hparams["t_max"] >= self.schedule.timesteps:
            raise ValueError(f"model.t_max={self.hparams['t_max']} must be below the schedule's {self.schedule.timesteps} steps")

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Logit (B,) that x_t (B,C,H,W) at integer t (B,) is real."""
        return self.net(x_t, t)

    def _noisy(self, x0: Tensor, t: Tensor) -> Tensor:
        assert self.schedule is not None
        return self.schedule.to(x0.device).q_sample(x0, t, torch.randn_like(x0))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, label = batch
        t_max = self.hparams["t_max"] if self.hparams["t_max"] is not None else self.schedule.timesteps - 1
        t = torch.randint(0, t_max + 1, (x0.shape[0],), device=x0.device)
        logit = self.net(self._noisy(x0, t), t)
        loss = F.binary_cross_entropy_with_logits(logit, label)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", ((logit > 0).float() == label).float().mean())
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x0, label = batch
        losses = []
        for t_val in VAL_TIMESTEPS:
            t = torch.full((x0.shape[0],), t_val, device=x0.device, dtype=torch.long)
            logit = self.net(self._noisy(x0, t), t)
            losses.append(F.binary_cross_entropy_with_logits(logit, label))
            self.val_auroc[f"t{t_val}"].update(logit, label.long())
            self.log(f"val/acc_t{t_val}", ((logit > 0).float() == label).float().mean(), batch_size=x0.shape[0])
        self.log("val/loss", torch.stack(losses).mean(), prog_bar=True, batch_size=x0.shape[0])

    def on_validation_epoch_end(self) -> None:
        for t_val in VAL_TIMESTEPS:
            metric = self.val_auroc[f"t{t_val}"]
            self.log(f"val/auroc_t{t_val}", metric.compute(), prog_bar=t_val == 0)
            metric.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def train_critic(
    diffusion_ckpt: str | Path,
    out_dir: str | Path,
    sampler: str = "configs/sampler/dpmpp.yaml",
    max_epochs: int = 60,
    critic: CriticConfig | None = None,
    seed: int = 0,
    fakes_per_real: int = 1,
) -> Path:
    """Train a critic in-process (no logger) and return its ``last.ckpt`` under ``out_dir``.

    The same training as ``python -m bdiff.lit.critic_module fit --config configs/critic/digits.yaml``,
    for notebooks and scripts; the real digits are the default split.
    """
    pl.seed_everything(seed, verbose=False)
    out_dir = Path(out_dir)
    data = CriticDataModule(str(diffusion_ckpt), sampler=sampler, cache_dir=str(out_dir / "fakes"),
                            fakes_per_real=fakes_per_real)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=out_dir / "checkpoints", save_last=True, save_top_k=0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False, callbacks=[checkpoint],
                         check_val_every_n_epoch=max(1, max_epochs // 5), enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=out_dir)
    trainer.fit(CriticModule(critic or CriticConfig()), datamodule=data)
    return Path(checkpoint.last_model_path)


def cached_critic(diffusion_ckpt: str | Path, out_dir: str | Path, sampler: str = "configs/sampler/dpmpp.yaml",
                  fakes_per_real: int = 1) -> Path:
    """``out_dir/checkpoints/last.ckpt``, trained by :func:`train_critic` against ``diffusion_ckpt`` unless one
    newer than the diffusion checkpoint is already there (notebooks and benchmarks reuse it; give another
    ``out_dir`` for other options)."""
    path = Path(out_dir) / "checkpoints" / "last.ckpt"
    if path.is_file() and path.stat().st_mtime >= Path(diffusion_ckpt).stat().st_mtime:
        stored = torch.load(path, map_location="cpu", weights_only=True).get("hyper_parameters", {})
        if (stored.get("fakes_per_real") or 1) == fakes_per_real:
            return path
    written = train_critic(diffusion_ckpt, out_dir, sampler=sampler, fakes_per_real=fakes_per_real)
    if written.resolve() != path.resolve():
        raise FileNotFoundError(f"critic training wrote {written}, expected {path}")
    return path


def main(argv: Sequence[str] | None = None) -> Any:
    """LightningCLI over :class:`CriticModule` and :class:`CriticDataModule` (``fit`` when no subcommand is given)."""
    from bdiff.lit.cli import BdiffCLI, SaveConfigToRun, cli_args, with_subcommand

    args = with_subcommand(sys.argv[1:] if argv is None else argv)
    return BdiffCLI(
        CriticModule,
        CriticDataModule,
        save_config_callback=SaveConfigToRun,
        args=cli_args(argv, args),
        parser_kwargs={"fit": {"description": "Train a time-conditioned critic against a diffusion checkpoint."}},
    )


if __name__ == "__main__":
    exit_on_user_error(main)
