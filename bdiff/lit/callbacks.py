"""Lightning callbacks (training-time hooks; not to be confused with sampler callbacks).

* :class:`SampleGrid`: every N steps (at validation, so EMA weights are in place)
  and at the end of fit, draws DDIM samples with the posterior-mean network and
  their uncertainty (per-pixel std over K posterior chains from the same noise),
  saves a PNG (samples | std maps) and logs both grids to W&B.
* :class:`RunSummary`: at the end of fit, prints where everything went.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from bdiff.sampling import chain_variance, ddim_sample
from bdiff.viz import save_side_by_side, uncertainty_grids


def run_dir(trainer: pl.Trainer) -> Path:
    """The folder of this run: the checkpoint folder's parent, else the trainer's root dir."""
    ckpt = trainer.checkpoint_callback
    dirpath = getattr(ckpt, "dirpath", None)
    return Path(dirpath).parent if dirpath else Path(trainer.default_root_dir)


class SampleGrid(pl.Callback):
    """Draw a sample grid plus uncertainty-map grid every ``every_n_steps`` and at the end of fit.

    Args:
        every_n_steps: draw at the first validation after this many steps since the last grid (0: only at the end).
        num_samples: images per grid.
        steps: DDIM steps.
        chains: K posterior chains for the uncertainty map (costs K extra sampling runs, batched).
        seed: the same seed every time, so grids are comparable across training.
    """

    def __init__(
        self, every_n_steps: int = 1000, num_samples: int = 64, steps: int = 50, chains: int = 8, seed: int = 0
    ) -> None:
        if num_samples < 1 or steps < 1 or every_n_steps < 0 or chains < 2:
            raise ValueError("SampleGrid needs num_samples >= 1, steps >= 1, every_n_steps >= 0, chains >= 2")
        self.every_n_steps, self.num_samples, self.steps, self.seed = every_n_steps, num_samples, steps, seed
        self.chains = chains
        self._last_step = 0
        self.final_png: Path | None = None

    def _draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> Path:
        denoiser = pl_module.denoiser
        was_training = denoiser.training
        denoiser.eval()
        generator = torch.Generator().manual_seed(self.seed)
        x_T = torch.randn((self.num_samples, *denoiser.image_shape), generator=generator).to(pl_module.device)
        images = ddim_sample(denoiser, x_T, self.steps)
        if denoiser.model.is_bayesian:
            chains = denoiser.posterior_chains(self.chains, torch.Generator(pl_module.device).manual_seed(self.seed))
            variance = chain_variance(chains, self.chains, x_T, self.steps)
        else:
            variance = torch.zeros_like(images)
        denoiser.train(was_training)
        nrow = max(1, int(self.num_samples**0.5))
        samples, uncertainty = uncertainty_grids(images, variance, nrow)
        out = save_side_by_side(run_dir(trainer) / "samples" / f"{tag}.png", samples, uncertainty)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    key="samples",
                    images=[samples, uncertainty],
                    caption=[f"DDIM-{self.steps} samples", f"per-pixel std over {self.chains} posterior chains"],
                    step=trainer.global_step,
                )
        return out

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.every_n_steps == 0:
            return
        if trainer.global_step - self._last_step >= self.every_n_steps:
            self._last_step = trainer.global_step
            self._draw(trainer, pl_module, f"step_{trainer.global_step:07d}")

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_fit_end runs after EMAWeightAveraging.on_train_end copied the average into the model.
        self.final_png = self._draw(trainer, pl_module, "final")


class RunSummary(pl.Callback):
    """Print, at the end of fit, where the checkpoints, sample grids, config and W&B run went."""

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        lines = ["", "bdiff run finished. Outputs:"]
        ckpt = trainer.checkpoint_callback
        if ckpt is not None:
            if getattr(ckpt, "last_model_path", ""):
                lines.append(f"  checkpoint (last): {ckpt.last_model_path}")
            if getattr(ckpt, "best_model_path", ""):
                lines.append(f"  checkpoint (best): {ckpt.best_model_path}")
        for cb in trainer.callbacks:
            if isinstance(cb, SampleGrid) and cb.final_png is not None:
                lines.append(f"  samples + uncertainty maps: {cb.final_png}")
        config = run_dir(trainer) / "config.yaml"
        if config.exists():
            lines.append(f"  config: {config}")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                mode = getattr(getattr(run, "settings", None), "mode", "")
                run_path = Path(run.dir).parent if getattr(run, "dir", None) else None
                if mode == "offline" and run_path is not None:
                    lines.append(f"  W&B (offline): {run_path}  -> upload with: wandb sync {run_path}")
                elif getattr(run, "url", None):
                    lines.append(f"  W&B: {run.url}")
        lines.append("  load it with: from bdiff import load_model; m = load_model('<checkpoint>')")
        print("\n".join(lines), flush=True)
