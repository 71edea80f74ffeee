"""LightningModule that trains the Bayesian U-Net by stochastic variational inference.

Loss per training step (one weight sample per minibatch, Blundell et al. 2015):

    loss = -(1/B) sum_b log N(eps_b; eps_w(x_t,b, t_b), sigma_w^2)  +  beta_kl * KL(q || p) / N

computed by Pyro's ``TraceMeanField_ELBO`` (see :mod:`bdiff.bayes.model`), with
t ~ U{0..T-1} and x_t ~ q(x_t | x_0) as in Ho et al. 2020. ``beta_kl`` ramps
linearly from ~0 to 1 over ``kl_warmup_steps`` (KL warm-up / annealing).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
import numpy as np
import torch
from torch import Tensor

from bdiff.bayes import BayesConfig, BayesianUNet, NonFiniteElboError
from bdiff.bayes.bottleneck_gp import BottleneckGP, restore as restore_gp
from bdiff.bayes.error_scale import EpistemicErrorScale, error_scale_images, fit_denoiser_error_scale
from bdiff.bayes.head import require_point_trunk
from bdiff.bayes.prior_fusion import PriorWeight, fit_denoiser_prior, prior_images
from bdiff.bayes.recalibration import (
    FINAL_DRAWS,
    KnotErrors,
    VarianceCalibration,
    default_knots,
    fit_calibration,
    knot_errors,
    merge_knot_errors,
)
from bdiff.checkpoint import plain_config, build_denoiser
from bdiff.gaussian_denoiser import GaussianDenoiser
from bdiff.lit.callbacks import ExactResume, last_validation_of_fit
from bdiff.nets import UNetConfig
from bdiff.schedule import NoiseSchedule, ScheduleConfig


def _as(cls: type, value: Any) -> Any:
    """Accept a dataclass or the plain dict stored in a checkpoint's hyper-parameters."""
    return cls(**value) if isinstance(value, dict) else value


class DiffusionModule(pl.LightningModule):
    """Bayesian diffusion model: SVI training, calibrated validation, EMA-ready.

    Args:
        net: U-Net shape.
        bayes: which layers are Bayesian, priors, guide, predictive.
        schedule: noise schedule.
        lr: AdamW learning rate (after a linear warm-up of ``lr_warmup_steps``).
        weight_decay: AdamW weight decay on the deterministic weights and guide locs.
        lr_warmup_steps: steps of linear learning-rate warm-up.
        lr_decay: after the warm-up, ``cosine`` (default) anneals ``lr`` to 0 at
            ``trainer.max_steps`` (SGDR's half cosine, Loshchilov & Hutter 2017), so the last
            steps average out the gradient noise of a short run (docs/training.md, "bf16 and the
            cosine learning-rate decay"); needs ``trainer.max_steps``. ``none`` keeps ``lr``.
        kl_warmup_steps: steps over which the KL weight ramps to 1 (0: no warm-up).
        num_data: N, the training-set size the KL is divided by. None: taken from
            the datamodule's ``num_train`` at setup.
        warm_start: a bdiff checkpoint whose U-Net weights initialise this model
            (and centre the prior when ``bayes.prior_center: init``).
        guide_scale_lr_mult: learning-rate multiplier for the guide's posterior scales (their
            softplus-unconstrained values start near -7 and move slowly at the base rate).
        on_nonfinite: a NaN/inf loss ``raise``s an error naming the step, or is ``skip``ped
            (no optimizer step; counted in ``train/skipped_batches``). A non-finite
            gradient always raises: a half-applied update would corrupt the weights.
        variance_calibration_knots: K > 0 fits a per-t scale of the aleatoric variance on the
            validation images at every validation (EMA weights in place), at K timestep knots,
            so held-out z^2 = 1 (:mod:`bdiff.bayes.recalibration`; where the epistemic variance
            alone exceeds the error, one common scale of both); it is saved in the checkpoint.
            0 keeps the variance head's raw output.
        epistemic_gp: (default on) at every validation (EMA weights in place, before the
            calibration's errors are collected) fit the bottleneck GP on up to 2,048 training
            images, three noisings per image and t-knot (before the fit's last validation: 512
            images, one) (:mod:`bdiff.bayes.bottleneck_gp`): an epistemic variance that notices
            images unlike the training data, which the head's posterior alone does not
            (BENCHMARKS.md, "Held-out digit class"). Saved in the checkpoint; needs a point trunk
            (only the head may be Bayesian) and a datamodule; ``false`` turns it off.
    """

    MAX_CALIBRATION_PIXELS = 1 << 17  # per knot: ~2k digits or ~40 RGB 32x32 images' worth
    EPISTEMIC_GP_IMAGES = 2048  # training images the bottleneck GP is fitted on (x 3 noisings at each of its t-knots)
    PRIOR_IMAGES = 8192  # training images the Wiener filter's mean and covariance are fitted on

    def __init__(
        self,
        net: UNetConfig = UNetConfig(),
        bayes: BayesConfig = BayesConfig(),
        schedule: ScheduleConfig = ScheduleConfig(),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_warmup_steps: int = 200,
        lr_decay: Literal["none", "cosine"] = "cosine",
        kl_warmup_steps: int = 0,
        num_data: int | None = None,
        warm_start: str | None = None,
        guide_scale_lr_mult: float = 1.0,
        on_nonfinite: Literal["raise", "skip"] = "raise",
        variance_calibration_knots: int = 32,
        epistemic_gp: bool = True,
    ) -> None:
        super().__init__()
        net, bayes, schedule = _as(UNetConfig, net), _as(BayesConfig, bayes), _as(ScheduleConfig, schedule)
        net.channel_mults, net.attention_resolutions = tuple(net.channel_mults), tuple(net.attention_resolutions)
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        if kl_warmup_steps < 0 or lr_warmup_steps < 0:
            raise ValueError("model.kl_warmup_steps and model.lr_warmup_steps must be >= 0")
        if guide_scale_lr_mult <= 0:
            raise ValueError(f"model.guide_scale_lr_mult must be > 0, got {guide_scale_lr_mult}")
        if lr_decay not in ("none", "cosine"):
            raise ValueError(f"model.lr_decay must be 'none' or 'cosine', got {lr_decay!r}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"model.on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        if variance_calibration_knots < 0 or variance_calibration_knots == 1:
            raise ValueError(
                f"model.variance_calibration_knots must be 0 (off) or >= 2, got {variance_calibration_knots}"
            )
        # Plain dicts, so a checkpoint loads with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "net": asdict(net),
                "bayes": asdict(bayes),
                "schedule": asdict(schedule),
                "lr": lr,
                "weight_decay": weight_decay,
                "lr_warmup_steps": lr_warmup_steps,
                "lr_decay": lr_decay,
                "kl_warmup_steps": kl_warmup_steps,
                "num_data": num_data,
                "warm_start": warm_start,
                "guide_scale_lr_mult": guide_scale_lr_mult,
                "on_nonfinite": on_nonfinite,
                "variance_calibration_knots": variance_calibration_knots,
                "epistemic_gp": epistemic_gp,
            }
        )
        self.denoiser = build_denoiser(net, bayes, schedule, warm_start=warm_start)
        if epistemic_gp:
            require_point_trunk(self.denoiser.model, "model.epistemic_gp")
        # The net's copies of the Bayesian weights are only initial means: the guide owns them.
        params = dict(self.bayes.net.named_parameters())
        for name in self.bayes.bayesian_names:
            params[name].requires_grad_(False)
        self.num_data = num_data
        self.skipped_batches = 0
        knots = variance_calibration_knots
        self.calibration_knots = default_knots(schedule.timesteps, knots) if knots else []
        self._calibration_errors: list[list[KnotErrors]] = []

    @property
    def bayes(self) -> BayesianUNet:
        return self.denoiser.model

    @property
    def schedule(self) -> NoiseSchedule:
        return self.denoiser.schedule

    def setup(self, stage: str) -> None:
        if stage == "fit" and not self._precision().startswith("bf16"):
            # Channels-last U-Net weights while fitting: the same numbers in the memory order oneDNN's CPU
            # convolutions prefer, ~6% off a digits step on 2 CPU cores (benchmarks/training_step_cost.py).
            # Here, before a DDP strategy wraps the model (its gradient buckets follow the parameters'
            # layout); undone in on_train_end, because in that order the convolutions' results depend on
            # the batch size by ~1e-5 and a sample must not depend on how a run is cut into chunks.
            # Not under bf16 autocast: there torch's CPU GroupNorm is ~3x slower channels-last.
            self.denoiser.to(memory_format=torch.channels_last)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            if self.hparams.get("epistemic_gp") and stage == "fit":
                raise ValueError("model.epistemic_gp fits the GP on the datamodule's train_dataset: train with a "
                                 "datamodule (data: in the config), not bare dataloaders")
            return
        cfg = self.bayes.net.config
        if (datamodule.channels, datamodule.image_size) != (cfg.in_channels, cfg.image_size):
            raise ValueError(
                f"the data gives {datamodule.channels}x{datamodule.image_size}x{datamodule.image_size} images but "
                f"model.net expects {cfg.in_channels}x{cfg.image_size}x{cfg.image_size}: set "
                f"model.net.in_channels={datamodule.channels} and model.net.image_size={datamodule.image_size}"
            )
        if self.num_data is None and stage == "fit":
            datamodule.setup(stage)
            self.num_data = datamodule.num_train
            self.hparams["num_data"] = self.num_data

    def _precision(self) -> str:
        """The trainer's precision setting (``"32-true"``, ``"bf16-mixed"``, ...); ``"32-true"`` without one."""
        return str(self._trainer.precision) if self._trainer is not None else "32-true"

    def configure_callbacks(self) -> list[pl.Callback]:
        """Every fit saves the RNG and data-order state needed to resume bit for bit (see :class:`ExactResume`)."""
        return [ExactResume()]

    def on_train_start(self) -> None:
        """A resumed run that trains on drops the r(t) its checkpoint carried: it described the old weights
        (the fit's last validation fits a new one), so no checkpoint saved on the way carries a stale one."""
        if not last_validation_of_fit(self.trainer):
            self.denoiser.error_scale = None
            self.denoiser.prior, self.denoiser.prior_weight = None, None

    def on_fit_start(self) -> None:
        """Under DDP, give every rank its own random stream for t, x_t noise and Pyro's weight noise.

        ``seed_everything`` seeds every rank alike, so all ranks would draw the same t, the same
        noise and the same weight sample for their (different) images. Each rank is reseeded from
        (global seed, rank) after the model is built and broadcast, so the initial weights stay
        identical; a single process keeps its stream unchanged.
        """
        if self.trainer.world_size > 1:
            base = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
            seed = np.random.SeedSequence([base, self.global_rank]).generate_state(1, dtype=np.uint64)[0]
            torch.manual_seed(int(seed))

    def on_train_end(self) -> None:
        """Back to PyTorch's default order (the EMA callback has copied the average in by now), so the
        trained model predicts bit for bit like one loaded from its checkpoint."""
        self.denoiser.to(memory_format=torch.contiguous_format)

    def kl_weight(self) -> float:
        """KL warm-up factor in (0, 1] at the current step."""
        warmup = self.hparams["kl_warmup_steps"]
        return 1.0 if warmup == 0 else min(1.0, (self.global_step + 1) / warmup)

    def _noised(self, x0: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """t ~ U{0..T-1}, noise ~ N(0, I), x_t ~ q(x_t|x0). Returns (x_t, t, noise)."""
        b = x0.shape[0]
        t = torch.randint(0, self.schedule.timesteps, (b,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device) if generator else torch.randn_like(x0)
        return self.schedule.q_sample(x0, t, noise), t, noise

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor | None:
        if self.num_data is None:
            raise RuntimeError("model.num_data is unknown: train with a datamodule or set model.num_data")
        if not torch.isfinite(batch).all():
            return self._nonfinite("non-finite values in the input batch", batch_idx)
        x_t, t, noise = self._noised(batch)
        beta = self.kl_weight()
        try:
            loss, loglik = self.bayes.negative_elbo(x_t, t, noise, self.num_data, kl_weight=beta)
        except NonFiniteElboError as e:  # NaN/inf likelihood or posterior, caught before Pyro's validation
            return self._nonfinite(str(e), batch_idx)
        if not torch.isfinite(loss):
            return self._nonfinite(f"non-finite training loss {loss.item()}", batch_idx)
        self.log("train/loss", loss, prog_bar=True)
        if self._logging_step():
            # The likelihood term of the chosen objective (bayes.objective); val/gaussian_nll_* is the exact NLL.
            self.log("train/nll_per_pixel", -loglik.mean() / batch[0].numel())
            self.log("train/kl_weight", beta)
            if self.bayes.is_bayesian:
                self.log("train/kl_per_datum", self.bayes.kl_divergence() / self.num_data)
        return loss

    def _logging_step(self) -> bool:
        """True on the steps the logger writes: Lightning's rule, (optimizer steps so far + 1) divisible by
        ``trainer.log_every_n_steps``. Other steps' values would be dropped, and each ``self.log`` call
        costs up to ~1 ms on 2 CPU cores (cProfile of a default run)."""
        n = self.trainer.log_every_n_steps
        return n > 0 and (self.global_step + 1) % n == 0

    def _nonfinite(self, what: str, batch_idx: int) -> None:
        """Raise naming the step, or count the batch and return None (Lightning then skips the update)."""
        if self.hparams["on_nonfinite"] == "raise":
            raise FloatingPointError(
                f"{what} at step {self.global_step} (batch {batch_idx}); "
                "set model.on_nonfinite: skip to skip such batches"
            )
        self.skipped_batches += 1
        self.log("train/skipped_batches", float(self.skipped_batches))
        return None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:  # a skipped batch: no gradients this step
            return
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        if not torch.isfinite(norm):
            raise FloatingPointError(f"non-finite gradient norm {norm.item()} at step {self.global_step}")
        if self._logging_step():
            self.log("train/grad_norm", norm)

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        """Held-out denoising error and calibration of the predicted variance, at fixed seeded (t, noise).

        In full precision even under mixed-precision training (``trainer.precision: bf16-mixed``):
        the metrics and the variance calibration fitted here describe the model as it samples.
        """
        with torch.autocast(self.device.type, enabled=False):
            self._validate(batch, batch_idx)

    def _validate(self, batch: Tensor, batch_idx: int) -> None:
        generator = torch.Generator().manual_seed(10_000 + batch_idx)
        x_t, t, noise = self._noised(batch, generator)
        pred = self.denoiser.predict(x_t, t)
        err2 = (noise - pred.eps) ** 2
        metrics = {"val/mse": err2.mean()}
        for kind, var in (("total", pred.var_total), ("aleatoric", pred.var_aleatoric)):
            var = var.clamp_min(1e-12)
            metrics[f"val/z2_{kind}"] = (err2 / var).mean()  # ideal 1
            metrics[f"val/gaussian_nll_{kind}"] = 0.5 * (math.log(2 * math.pi) + var.log() + err2 / var).mean()
        if self.bayes.is_bayesian:
            metrics["val/var_epistemic"] = pred.var_epistemic.mean()
        self.log_dict(metrics, batch_size=batch.shape[0], prog_bar=False)
        self._collect_calibration_errors(batch, batch_idx)
        if batch_idx == self._last_validation_batch():
            self._fit_on_validation()

    def _last_validation_batch(self) -> int:
        """Index of this validation's last batch (-1: none is known to be last, a sanity check, or no Trainer)."""
        if self._trainer is None or self.trainer.sanity_checking:
            return -1
        n = self.trainer.num_val_batches[0] if self.trainer.num_val_batches else 0
        return int(n) - 1 if math.isfinite(n) else -1

    def _fit_on_validation(self) -> None:
        """Fit the variance calibration on this validation's errors (:mod:`bdiff.bayes.recalibration`), and at the
        fit's last validation the epistemic error scale r(t) on top of it (:mod:`bdiff.bayes.error_scale`).

        Runs after the last validation batch, not in ``on_validation_epoch_end``: a weight-averaging
        callback (:class:`bdiff.lit.ema.EMA`) swaps the training weights back in at epoch end, before the
        module's hook runs, and r(t) must describe the averaged weights the checkpoint holds. Under DDP
        each rank fits on its own share of the validation set (rank zero's is saved).
        """
        if self._calibration_errors:
            self._fit_calibration()
        if last_validation_of_fit(self.trainer):
            self._fit_prior()
            if self.denoiser.is_bayesian:
                self._fit_error_scale()

    def _collect_calibration_errors(self, batch: Tensor, batch_idx: int) -> None:
        """Errors of the uncalibrated predictive at every knot (weights in place: the EMA ones).

        At most MAX_CALIBRATION_PIXELS per knot are kept, so large images cost bounded time and memory.
        """
        remaining = self.MAX_CALIBRATION_PIXELS - sum(parts[0].err2.numel() for parts in self._calibration_errors)
        if not self.calibration_knots or self.trainer.sanity_checking or remaining <= 0:
            return
        generator = torch.Generator().manual_seed(20_000 + batch_idx)
        # Every validation refits cheaply (one noise draw per image and knot, ~3 s on 2 CPU cores for the
        # digits); the last one of the fit, whose weights the final checkpoint holds, takes FINAL_DRAWS.
        draws = FINAL_DRAWS if last_validation_of_fit(self.trainer) else 1
        images = batch[: max(1, -(-remaining // (batch[0].numel() * draws)))]
        self._calibration_errors.append(
            knot_errors(self.denoiser.predict_uncalibrated, self.schedule, images, self.calibration_knots, generator,
                        max_pixels=remaining, draws=draws)
        )

    def on_validation_epoch_start(self) -> None:
        self._calibration_errors = []
        if not self.trainer.sanity_checking and not last_validation_of_fit(self.trainer):
            self.denoiser.error_scale = None  # r(t) describes the final weights only: never saved beside others
            self.denoiser.prior, self.denoiser.prior_weight = None, None  # so does w(t)
        if self.hparams.get("epistemic_gp") and not self.trainer.sanity_checking:
            # The last validation of the fit, whose weights the final checkpoint holds, fits on every image
            # (<= EPISTEMIC_GP_IMAGES) with the GP's 3 noisings per knot (~20 s on 2 CPU cores for the digits);
            # the others, for the checkpoints saved on the way, on the first 512 with one (~3 s).
            final = last_validation_of_fit(self.trainer)
            limit, draws = (self.EPISTEMIC_GP_IMAGES, 3) if final else (512, 1)
            with torch.random.fork_rng(devices=[]):  # a dataset's random transforms must not shift training's stream
                images = self._training_images(limit)
            self.denoiser.epistemic_gp = BottleneckGP.fit(self.bayes, self.schedule, images, draws=draws)

    def _training_images(self, limit: int) -> list[Tensor]:
        """Batches of 256 of the first ``limit`` training images (at most), on this module's device.

        Read from the datamodule's dataset, not the training loader: iterating that loader
        would advance its shuffling and the resumable sampler of :class:`ExactResume`.
        """
        dataset = self.trainer.datamodule.train_dataset
        n = min(len(dataset), limit)
        images = torch.stack([dataset[i] for i in range(n)]).to(self.device)
        return list(images.split(256))

    def on_validation_epoch_end(self) -> None:
        """Fit the calibration where no batch was known to be the last (:meth:`_fit_on_validation` fits both
        after the last batch); r(t) is not fitted here, where a weight average is no longer in place."""
        if self._calibration_errors:
            self._fit_calibration()

    def _fit_calibration(self) -> None:
        errors = merge_knot_errors(self._calibration_errors)
        self._calibration_errors = []
        self.denoiser.calibration = fit_calibration(self.calibration_knots, errors)
        cal = self.denoiser.calibration
        log_scale = torch.tensor(cal.log_scale)
        # the epistemic scale's min is 0 unless somewhere the epistemic variance alone exceeded the error
        log_epistemic = torch.tensor(cal.log_epistemic_scale or (0.0,))
        self.log_dict({"val/calibration_log_scale_min": log_scale.min(), "val/calibration_log_scale_max": log_scale.max(),
                       "val/calibration_log_epistemic_scale_min": log_epistemic.min()})

    def _fit_error_scale(self) -> None:
        """Fit r(t), the epistemic variance in the units of the mean's error (:mod:`bdiff.bayes.error_scale`).

        Once, at the fit's last validation (the weights the final checkpoint holds), on the images
        :func:`~bdiff.bayes.error_scale.error_scale_images` picks (fewer for large images:
        MAX_CALIBRATION_PIXELS per split and knot).
        """
        dm = self.trainer.datamodule
        with torch.random.fork_rng(devices=[]):  # a dataset's random transforms must not shift training's stream
            train, val = error_scale_images(dm.train_dataset, dm.val_dataset, self.MAX_CALIBRATION_PIXELS)
        train, val = train.to(self.device), val.to(self.device)
        if len(val) < 2 or len(train) < 2:
            rank_zero_warn(f"the epistemic error scale r(t) needs >= 2 held-out and >= 2 training images, got {len(val)} "
                           f"and {len(train)}: this run's checkpoint has none, so the sampler callbacks that read it "
                           "(blending) will refuse it. Raise data.val_fraction or add images.")
            return
        with torch.autocast(self.device.type, enabled=False):
            self.denoiser.error_scale = fit_denoiser_error_scale(self.denoiser, train, val)
        self.log("val/error_scale_max", max(self.denoiser.error_scale.scale), rank_zero_only=True)

    def _fit_prior(self) -> None:
        """Fit the Wiener filter of the training images and the network's weight over it, w(t), on held-out images
        (:mod:`bdiff.bayes.prior_fusion`): once, at the fit's last validation, for the weights the checkpoint holds.
        ~45 s for the photos on 2 CPU cores, most of it 16 x 256 predictions with the GP."""
        dm = self.trainer.datamodule
        with torch.random.fork_rng(devices=[]):  # a dataset's random transforms must not shift training's stream
            train, val = prior_images(dm.train_dataset, dm.val_dataset, self.PRIOR_IMAGES)
        if len(val) < 2 or len(train) < 2:
            rank_zero_warn("the Wiener-filter fallback (sampler callback PriorFusion) needs >= 2 held-out and >= 2 "
                           "training images: this run's checkpoint has none. Raise data.val_fraction or add images.")
            return
        with torch.autocast(self.device.type, enabled=False):
            self.denoiser.prior, self.denoiser.prior_weight = fit_denoiser_prior(self.denoiser, train,
                                                                                 val.to(self.device))
        self.log("val/prior_weight_min", min(self.denoiser.prior_weight.weight), rank_zero_only=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the fitted variance calibration (plain lists: loads with weights_only=True)."""
        if self.denoiser.calibration is not None:
            checkpoint["variance_calibration"] = self.denoiser.calibration.to_dict()
        if self.denoiser.epistemic_gp is not None:
            checkpoint["bottleneck_gp"] = self.denoiser.epistemic_gp.to_dict()
        if self.denoiser.error_scale is not None:
            checkpoint["epistemic_error_scale"] = self.denoiser.error_scale.to_dict()
        if self.denoiser.prior is not None and self.denoiser.prior_weight is not None:
            checkpoint["gaussian_prior"] = self.denoiser.prior.to_dict()
            checkpoint["prior_weight"] = self.denoiser.prior_weight.to_dict()

    def configure_optimizers(self) -> dict[str, Any]:
        lr = self.hparams["lr"]
        trainable = [p for p in self.parameters() if p.requires_grad]
        scale_ids = {id(p) for p in self.bayes.posterior_scale_parameters()}
        scales = [p for p in trainable if id(p) in scale_ids]
        others = [p for p in trainable if id(p) not in scale_ids]
        groups = [{"params": others, "lr": lr}]
        if scales:
            groups.append({"params": scales, "lr": lr * self.hparams.get("guide_scale_lr_mult", 1.0), "weight_decay": 0.0})
        # fused: the whole update in one kernel (CPU and CUDA), 1.5 ms a step against 5.5 ms for torch's CPU
        # default on 2 cores (benchmarks/training_step_cost.py). Not under Lightning's mixed precision (fp16
        # or bf16), which refuses to clip the gradients of an optimizer that could unscale them in step().
        precision = self._precision()
        fused = not (precision.startswith("16") or precision.endswith("-mixed"))
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=self.hparams["weight_decay"], fused=fused, foreach=not fused)
        warmup = max(1, self.hparams["lr_warmup_steps"])
        sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0 / warmup, total_iters=warmup)
        if self.hparams.get("lr_decay", "none") == "cosine":
            max_steps = self.trainer.max_steps if self._trainer is not None else -1
            if max_steps < 1:
                raise ValueError(f"model.lr_decay cosine anneals to 0 at trainer.max_steps: set trainer.max_steps, "
                                 f"got {max_steps}")
            # A run shorter than the warm-up ends inside it (a smoke run): nothing left to anneal.
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, max_steps - warmup))
            sched = torch.optim.lr_scheduler.SequentialLR(opt, [sched, cosine], milestones=[warmup])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another architecture with a clear message (before load_state_dict)."""
        if "variance_calibration" in checkpoint:
            self.denoiser.calibration = VarianceCalibration.from_dict(checkpoint["variance_calibration"])
        if "bottleneck_gp" in checkpoint:
            self.denoiser.epistemic_gp = restore_gp(checkpoint["bottleneck_gp"])
        if "epistemic_error_scale" in checkpoint:
            self.denoiser.error_scale = EpistemicErrorScale.from_dict(checkpoint["epistemic_error_scale"])
        if "gaussian_prior" in checkpoint and "prior_weight" in checkpoint:
            self.denoiser.prior = GaussianDenoiser.from_dict(checkpoint["gaussian_prior"], self.schedule)
            self.denoiser.prior_weight = PriorWeight.from_dict(checkpoint["prior_weight"])
        saved = checkpoint.get("hyper_parameters", {})
        for key in ("net", "bayes"):
            mine, theirs = self.hparams[key], saved.get(key)
            if key == "bayes" and theirs is not None:
                mine, theirs = mine["layers"], theirs.get("layers")
            if theirs is not None and plain_config(theirs) != plain_config(mine):
                raise ValueError(
                    f"checkpoint was trained with model.{key}={theirs} but this model has model.{key}={mine}; "
                    "use the config the checkpoint was trained with"
                )

