"""Lightning callbacks (training-time hooks; not to be confused with sampler callbacks).

* :class:`SampleGrid`: every N steps (at validation, so EMA weights are in place)
  and at the end of fit, draws DDIM samples with the posterior-mean network and
  their uncertainty (per-pixel std over K posterior chains from the same noise),
  saves a PNG (samples | std maps) and logs both grids to W&B; at the end of fit
  also a ``wandb.Table`` with one row per sample. Each preview says in one line
  what it draws, shows a progress bar, and keeps to a time budget
  (:mod:`bdiff.lit.preview`).
* :class:`RunSummary`: at the end of fit, prints where everything went.
* :class:`ExactResume`: saves the random-number generators and the position in the
  shuffled epoch in every checkpoint, so a run killed and resumed from a checkpoint
  continues bit for bit like one that never stopped (added to every fit by
  :meth:`bdiff.lit.module.DiffusionModule.configure_callbacks`), and the W&B run id, so
  the resumed fit continues the same run folder and W&B run (:mod:`bdiff.lit.cli`).
* :class:`FinalValidation`: validates after the fit's last step when the validation cadence
  (``trainer.val_check_interval``) does not land on ``trainer.max_steps`` (added to every
  fit by :class:`bdiff.lit.cli.BdiffCLI`).
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler, Sampler
from tqdm import tqdm

from bdiff.lit.preview import PreviewPlan, PreviewProgress, measure_cost, plan_preview, preview_budget
from bdiff.sampling import chain_variance, ddim_sample_and_variance
from bdiff.viz import save_side_by_side, uncertainty_grids
from bdiff.wandb_log import sample_table


def last_validation_of_fit(trainer: pl.Trainer) -> bool:
    """True when this validation runs after the fit's final optimizer step (max_steps or max_epochs)."""
    if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    return trainer.max_epochs not in (None, -1) and trainer.current_epoch >= trainer.max_epochs - 1


class FinalValidation(pl.Callback):
    """Validate after the fit's last optimizer step (``trainer.max_steps``), whatever the cadence.

    Lightning validates every ``val_check_interval`` training batches (or every
    ``check_val_every_n_epoch`` epochs), so a ``max_steps`` that the cadence does not divide ends
    the fit without validating its final weights: the last checkpoint would carry a variance
    calibration and a bottleneck GP fitted on older weights (:func:`last_validation_of_fit`) and
    ``ModelCheckpoint(monitor=...)`` would never score them. At the last step this callback sets
    ``trainer.should_stop``, for which Lightning's loop runs the validation of that batch; where the
    cadence divides ``max_steps`` that is the one validation already due, not a second one. Under
    an epoch cadence it validates only in an epoch that validates anyway.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


def run_dir(trainer: pl.Trainer) -> Path:
    """The folder of this run: the checkpoint folder's parent, else the trainer's root dir."""
    ckpt = trainer.checkpoint_callback
    dirpath = getattr(ckpt, "dirpath", None)
    return Path(dirpath).parent if dirpath else Path(trainer.default_root_dir)


class SampleGrid(pl.Callback):
    """Draw a sample grid plus uncertainty-map grid every ``every_n_steps`` and at the end of fit.

    Each preview prints one line saying what it draws, e.g. ``preview: 64 samples x DDIM-50,
    uncertainty from 8 posterior chains (est. 12 s, budget 60 s)``, and shows a progress bar
    when the trainer shows one. It keeps to a time budget: at most ``max_fraction`` of the
    training wall time so far (less what earlier previews took), or ``min_seconds``, whichever is
    larger. One timed denoiser call on the preview batch gives the cost; when the estimate is
    over, the preview gets fewer chains, then the propagated map instead of chains, then fewer
    steps and samples (the order is in :mod:`bdiff.lit.preview`). The final preview runs on the
    device training used (Lightning has moved the model to the CPU by then) and is also logged
    to W&B as a ``wandb.Table``, one row per sample (image, uncertainty map, mean per-pixel
    variance, NFE), so samples can be sorted by uncertainty.

    Args:
        every_n_steps: draw at the first validation after this many steps since the last grid (0: only at
            the end), except the fit's last validation, whose weights the final preview draws anyway.
        num_samples: images per grid.
        steps: DDIM steps.
        chains: K posterior chains for the uncertainty map (costs K extra sampling runs, batched).
        seed: the same seed every time, so grids are comparable across training.
        uncertainty: ``chains`` (variance over K chains, the reference) or ``propagated`` (the
            sampler's propagated map: no extra denoiser calls).
        max_fraction: the share of the training wall time previews may take; None: no budget,
            always draw what is configured.
        min_seconds: a preview may always take this long.
        min_samples: the budget never cuts the samples below this.
        min_steps: the budget never cuts the DDIM steps below this.
        progress_bar: show a progress bar (only when the trainer shows one).
        table: log the final preview as a W&B table (when a W&B logger is used).
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_samples: int = 64,
        steps: int = 50,
        chains: int = 8,
        seed: int = 0,
        uncertainty: Literal["chains", "propagated"] = "chains",
        max_fraction: float | None = 0.1,
        min_seconds: float = 60.0,
        min_samples: int = 4,
        min_steps: int = 10,
        progress_bar: bool = True,
        table: bool = True,
    ) -> None:
        if num_samples < 1 or steps < 1 or every_n_steps < 0 or chains < 2:
            raise ValueError("SampleGrid needs num_samples >= 1, steps >= 1, every_n_steps >= 0, chains >= 2")
        if uncertainty not in ("chains", "propagated"):
            raise ValueError(f"SampleGrid uncertainty must be 'chains' or 'propagated', got {uncertainty!r}")
        if max_fraction is not None and not 0 < max_fraction <= 1:
            raise ValueError(f"SampleGrid max_fraction must be in (0, 1] or null (no budget), got {max_fraction}")
        if min_seconds < 0 or min_samples < 1 or min_steps < 1:
            raise ValueError("SampleGrid needs min_seconds >= 0, min_samples >= 1 and min_steps >= 1, got "
                             f"{min_seconds}, {min_samples}, {min_steps}")
        self.every_n_steps, self.num_samples, self.steps, self.seed = every_n_steps, num_samples, steps, seed
        self.chains, self.uncertainty = chains, uncertainty
        self.max_fraction, self.min_seconds = max_fraction, min_seconds
        self.min_samples, self.min_steps = min_samples, min_steps
        self.progress_bar, self.table = progress_bar, table
        self._last_step = 0
        self.final_png: Path | None = None
        self.last_plan: PreviewPlan | None = None  # what the last preview drew
        self.last_seconds: float | None = None  # and how long it took
        self._train_start: float | None = None  # perf_counter at the start of training (this process)
        self._spent = 0.0  # seconds this run's previews took so far
        self._device: torch.device | None = None  # where training ran

    # -- what to draw ------------------------------------------------------------------------------
    def budget(self) -> float | None:
        """Seconds the next preview may take (:func:`~bdiff.lit.preview.preview_budget`); None: no budget."""
        elapsed = 0.0 if self._train_start is None else time.perf_counter() - self._train_start
        return preview_budget(elapsed, self._spent, self.max_fraction, self.min_seconds)

    def _plan(self, denoiser: Any, x_T: Tensor, chains: Any) -> PreviewPlan:
        """The plan for this preview; times one denoiser call (and one chains call) when there is a budget."""
        preferred = self.uncertainty if denoiser.model.is_bayesian else "none"
        budget = self.budget()
        if budget is None:
            return plan_preview(self.num_samples, self.steps, self.chains, preferred, None, None)
        cost = measure_cost(denoiser, x_T, chains, self.chains if preferred == "chains" else 0)
        return plan_preview(self.num_samples, self.steps, self.chains, preferred, cost, budget,
                            self.min_samples, self.min_steps)

    def _sample(self, trainer: pl.Trainer, denoiser: Any, device: torch.device,
                what: str) -> tuple[Tensor, Tensor, Tensor, PreviewPlan]:
        """images (N,C,H,W) in [-1, 1], variance (N,C,H,W) on that scale, nfe (N,), and the plan."""
        generator = torch.Generator().manual_seed(self.seed)
        x_T = torch.randn((self.num_samples, *denoiser.image_shape), generator=generator).to(device)
        bayesian = denoiser.model.is_bayesian
        chains = None
        if bayesian and self.uncertainty == "chains":
            chains = denoiser.posterior_chains(self.chains, torch.Generator(device).manual_seed(self.seed))
        plan = self._plan(denoiser, x_T, chains)
        rank_zero_info(plan.describe(what))
        x_T = x_T[: plan.num_samples]  # the first samples of the full grid
        show = self.progress_bar and getattr(trainer, "progress_bar_callback", None) is not None
        with tqdm(total=plan.steps * (2 if plan.uncertainty == "chains" else 1), desc=what, unit="step",
                  leave=False, disable=not show) as bar:
            progress = [PreviewProgress(bar)]
            images, variance, nfe = ddim_sample_and_variance(denoiser, x_T, plan.steps, callbacks=progress)
            if plan.uncertainty == "chains":
                if plan.chains != self.chains:
                    chains = denoiser.posterior_chains(plan.chains, torch.Generator(device).manual_seed(self.seed))
                variance = chain_variance(chains, plan.chains, x_T, plan.steps, callbacks=progress)
            elif plan.uncertainty == "none":
                variance = torch.zeros_like(images)
        return images, variance, nfe, plan

    def _draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str, final: bool = False) -> Path:
        denoiser = pl_module.denoiser
        was_training = denoiser.training
        start = time.perf_counter()
        device = pl_module.device
        if final and self._device is not None and self._device != device:
            device = self._device  # Lightning's teardown moved the model to the CPU; draw where training ran
            denoiser.to(device)
        denoiser.eval()
        try:
            what = "preview (final)" if final else "preview"
            images, variance, nfe, plan = self._sample(trainer, denoiser, device, what)
        finally:
            denoiser.train(was_training)
            if device != pl_module.device:
                denoiser.to(pl_module.device)
        nrow = max(1, int(plan.num_samples**0.5))
        samples, uncertainty = uncertainty_grids(images, variance, nrow)
        out = save_side_by_side(run_dir(trainer) / "samples" / f"{tag}.png", samples, uncertainty)
        maps = {"chains": f"per-pixel std over {plan.chains} posterior chains",
                "propagated": "propagated per-pixel std", "none": "no uncertainty (deterministic model)"}
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    key="samples",
                    images=[samples, uncertainty],
                    caption=[f"DDIM-{plan.steps} samples", maps[plan.uncertainty]],
                    step=trainer.global_step,
                )
                if final and self.table:
                    log_sample_table(logger, "samples_table", images, None if plan.uncertainty == "none" else variance,
                                     nfe, step=trainer.global_step)
        self.last_plan = plan
        self.last_seconds = time.perf_counter() - start
        self._spent += self.last_seconds
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}  # a resumed run draws its grids at the same steps

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", 0))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_start, self._spent, self._device = time.perf_counter(), 0.0, pl_module.device

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.every_n_steps == 0:
            return
        if trainer.global_step - self._last_step >= self.every_n_steps and not last_validation_of_fit(trainer):
            self._last_step = trainer.global_step  # (the last validation's weights are the final preview's)
            self._draw(trainer, pl_module, f"step_{trainer.global_step:07d}")

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_fit_end runs after EMAWeightAveraging.on_train_end copied the average into the model.
        self.final_png = self._draw(trainer, pl_module, "final", final=True)


def log_sample_table(logger: WandbLogger, key: str, images: Tensor, variance: Tensor | None, nfe: Tensor,
                     critic_logit: Tensor | None = None, step: int | None = None) -> bool:
    """Log one W&B table row per sample; never raises. True if it was logged.

    images (N,C,H,W) in [-1, 1] and variance (N,C,H,W) on that scale (None: no uncertainty), nfe (N,),
    critic_logit (N,). The table holds them on the [0, 1] image scale, as the samples file does.
    An :class:`~bdiff.lit.wandb.AutoWandbLogger` falls back offline on a failure; another
    ``WandbLogger`` gets a warning.
    """
    images01 = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)
    var01 = None if variance is None else variance.detach().float().cpu() / 4  # Var[(x+1)/2] = Var[x]/4
    nfe = nfe.detach().cpu()
    logit = None if critic_logit is None else critic_logit.detach().float().cpu()
    if callable(getattr(logger, "log_sample_table", None)):
        return bool(logger.log_sample_table(key, images01, var01, nfe, logit, step=step))
    try:
        logger.log_metrics({key: sample_table(images01, var01, nfe, logit)}, step)
        return True
    except Exception as e:
        rank_zero_warn(f"W&B: the samples table {key!r} was not logged ({type(e).__name__}: {e}); training continues.")
        return False


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
            if getattr(logger, "switched_off", False):
                lines.append(f"  W&B: switched off after failures: {'; '.join(logger.failures)}")  # type: ignore[attr-defined]
            elif isinstance(logger, WandbLogger):
                run = logger.experiment
                mode = getattr(getattr(run, "settings", None), "mode", "")
                run_path = Path(run.dir).parent if getattr(run, "dir", None) else None
                if mode == "offline" and run_path is not None:
                    lines.append(f"  W&B (offline): {run_path}  -> upload with: wandb sync {run_path}")
                elif getattr(run, "url", None):
                    lines.append(f"  W&B: {run.url}")
                if mode in ("online", "offline"):
                    lines.append(f"  {_artifact_line(logger, run, mode)}")
        lines.append("  load it with: from bdiff import load_model; m = load_model('<checkpoint>')")
        print("\n".join(lines), flush=True)


def _artifact_line(logger: WandbLogger, run: Any, mode: str) -> str:
    """One line on whether the checkpoints go to W&B as artifacts (the logger's ``log_model``)."""
    log_model = getattr(logger, "_log_model", False)
    if not log_model:
        why = " (offline run; log_model: true adds them to it for `wandb sync`)" if mode == "offline" else ""
        return f"W&B checkpoints: not logged as artifacts{why}"
    name = getattr(logger, "_checkpoint_name", None) or f"model-{getattr(run, 'id', '<run id>')}"
    when = "as they are saved" if log_model == "all" else "when fit ends"
    return f"W&B checkpoints: artifact {name} (type model, aliases latest/best), logged {when}"


WANDB_RUN_ID_KEY = "wandb_run_id"  # the checkpoint key :class:`ExactResume` stores the W&B run id under


def wandb_run_id(trainer: pl.Trainer) -> str | None:
    """The id of the first W&B logger's run (its ``version``: the run folder's name), None without one."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger.version is not None:
            return str(logger.version)
    return None


def collect_rng_states() -> dict[str, Any]:
    """This process's global RNG states (torch CPU and CUDA, NumPy, Python), as weights-only-loadable objects."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`collect_rng_states`."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])


class ResumableSampler(Sampler[int]):
    """A DataLoader's sampler, wrapped so an epoch can be resumed part-way (installed by :class:`ExactResume`).

    The wrapped sampler draws its order from ``generator`` (a RandomSampler's shuffling generator,
    which the wrapper owns, so the DataLoader's own per-iterator seed draws do not touch it) or is
    seeded per epoch (DistributedSampler: ``set_epoch``). The wrapper records the generator state at
    the start of every epoch and can start the next epoch from a given state, skipping its first
    ``skip`` indices without loading them.
    """

    def __init__(self, inner: Sampler[int], generator: torch.Generator | None) -> None:
        self.inner, self.generator = inner, generator
        self.epoch_start_state: torch.Tensor | None = None
        self._resume: tuple[torch.Tensor | None, int] | None = None

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        if callable(getattr(self.inner, "set_epoch", None)):
            self.inner.set_epoch(epoch)  # type: ignore[attr-defined]

    def resume_next_epoch(self, generator_state: torch.Tensor | None, skip: int) -> None:
        """Start the next ``iter()`` from ``generator_state`` and drop its first ``skip`` indices."""
        self._resume = (generator_state, skip)

    def __iter__(self) -> Iterator[int]:
        skip = 0
        if self._resume is not None:
            (state, skip), self._resume = self._resume, None
            if state is not None and self.generator is not None:
                self.generator.set_state(state)
        if self.generator is not None:
            self.epoch_start_state = self.generator.get_state()
        return itertools.islice(iter(self.inner), skip, None)  # RandomSampler draws its permutation lazily


def _train_loaders(trainer: pl.Trainer) -> list[DataLoader]:
    loaders = trainer.train_dataloader
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    elif not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    return [dl for dl in loaders if isinstance(dl, DataLoader)]


def _resumable_sampler(loader: DataLoader) -> ResumableSampler | None:
    """The loader's :class:`ResumableSampler`, installed on first use; None if the loader has no batch sampler."""
    batch_sampler = loader.batch_sampler
    inner = getattr(batch_sampler, "sampler", None)
    if inner is None:
        return None
    if isinstance(inner, ResumableSampler):
        return inner
    generator = None
    if isinstance(inner, RandomSampler):
        # The sampler gets a generator of its own, continuing from the loader's current state (the same
        # first epoch as before); without one it would seed each epoch from the global torch RNG.
        generator = torch.Generator()
        if inner.generator is not None:
            generator.set_state(inner.generator.get_state())
        else:
            generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        inner.generator = generator
    wrapped = ResumableSampler(inner, generator)
    batch_sampler.sampler = wrapped  # type: ignore[union-attr]  # read lazily by BatchSampler.__iter__
    return wrapped


class ExactResume(pl.Callback):
    """Make a run resumed from a checkpoint continue exactly like one that never stopped.

    Lightning restores weights, optimizers, schedulers, callbacks and loop counters, but not

    * the random number generators: Pyro's weight noise, the diffusion time t and the noise added
      to x_0 all come from torch's global generator (each rank has its own stream under DDP);
    * the position inside a shuffled epoch: a plain DataLoader restarts its epoch, and its
      shuffling generator, from the beginning.

    The training stream is handed from batch to batch: the global RNG states (torch CPU and CUDA,
    NumPy, Python) are taken at the end of every training batch and put back at the start of the
    next one, so whatever runs in between (validation, its dataloader's seed draw, sample grids,
    epoch hooks, a resumed run's start-up) cannot shift it. Every checkpoint stores those states
    for every rank, and per training DataLoader the shuffling generator's state at the start of
    the current epoch and the number of batches already trained in it; a resumed epoch replays
    the same permutation and skips the batches already seen (indices only, nothing is loaded).

    Every checkpoint also records the id of the W&B run (``checkpoint["wandb_run_id"]``, the
    first :class:`~lightning.pytorch.loggers.WandbLogger`'s ``version``, which names the run folder
    ``<save_dir>/<project>/<id>``): ``train.py fit --ckpt_path ...`` gives it to the logger, so the
    resumed fit writes into the same folder and continues the same W&B run (:mod:`bdiff.lit.cli`).

    Added to every fit by :meth:`bdiff.lit.module.DiffusionModule.configure_callbacks`.
    """

    def __init__(self) -> None:
        self._trainer: pl.Trainer | None = None
        self._rng: dict[str, Any] | None = None  # the training stream as the last training batch left it
        self._to_restore: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._rng is not None:
            set_rng_states(self._rng)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._rng = collect_rng_states()

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        if trainer is None:
            return {}
        rng = self._rng if self._rng is not None else collect_rng_states()
        world = trainer.world_size
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            per_rank: list[Any] = [None] * world
            torch.distributed.all_gather_object(per_rank, rng)  # every rank builds the checkpoint dict
        else:
            per_rank = [rng]
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        epoch_finished = done >= trainer.num_training_batches
        loaders = []
        for loader in _train_loaders(trainer):
            sampler = _resumable_sampler(loader)
            gen = None if sampler is None else sampler.generator
            state = None
            if gen is not None:  # a finished epoch resumes with the next one, from the generator as it is now
                state = gen.get_state() if epoch_finished else sampler.epoch_start_state  # type: ignore[union-attr]
            loaders.append({"generator_state": state, "skip_batches": 0 if epoch_finished else int(done)})
        return {"rng_per_rank": per_rank, "loaders": loaders}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict or None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        run_id = wandb_run_id(trainer)
        if run_id is not None:
            checkpoint[WANDB_RUN_ID_KEY] = run_id

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loaders = _train_loaders(trainer)
        samplers = [_resumable_sampler(dl) for dl in loaders]
        state, self._to_restore = self._to_restore, None
        if state is not None:
            self._restore(trainer, loaders, samplers, state)
        if any(dl.num_workers > 0 for dl in loaders):
            # A worker-backed iterator draws its indices as soon as it is created, which Lightning did
            # before any hook ran: start the epoch's iterator again, now through the wrapped samplers.
            # (Single-process iterators read the sampler lazily, at the first batch.)
            fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
            if fetcher is not None:
                iter(fetcher)

    def _restore(self, trainer: pl.Trainer, loaders: list[DataLoader], samplers: list[ResumableSampler | None],
                 state: dict[str, Any]) -> None:
        per_rank = state["rng_per_rank"]
        if len(per_rank) != trainer.world_size:
            rank_zero_warn(
                f"ExactResume: the checkpoint was written by {len(per_rank)} process(es), this run has "
                f"{trainer.world_size}: random streams are restored per rank modulo {len(per_rank)}, not exactly."
            )
        self._rng = per_rank[trainer.global_rank % len(per_rank)]  # put back at the first batch
        if len(state["loaders"]) != len(loaders):
            rank_zero_warn("ExactResume: the number of training dataloaders changed; the data order is not restored.")
            return
        for loader, sampler, saved in zip(loaders, samplers, state["loaders"]):
            batch_size = getattr(loader.batch_sampler, "batch_size", None)
            if sampler is None or batch_size is None:
                rank_zero_warn("ExactResume: a training dataloader without a batch sampler restarts its epoch.")
                continue
            sampler.resume_next_epoch(saved["generator_state"], saved["skip_batches"] * batch_size)
