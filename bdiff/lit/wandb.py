"""Weights & Biases logger that works with or without credentials.

Mode is chosen in this order: ``WANDB_MODE`` in the environment (so
``WANDB_MODE=disabled`` always wins), then the ``mode`` argument, then online
if an API key is configured (``WANDB_API_KEY`` or a netrc entry from
``wandb login``), else offline with a one-line hint to ``wandb sync`` later.
Lightning's ``WandbLogger(offline=True)`` sets ``WANDB_MODE`` process-wide and
never unsets it; passing ``mode=`` to ``wandb.init`` avoids that leak.

W&B never stops training: when starting the run or any logging call raises (service
gone, network or disk error, a bug in a logged object), :class:`AutoWandbLogger` warns
once and continues in a fresh *offline* run in ``save_dir`` (what is logged from then
on is kept; ``wandb sync`` uploads it later); if that fails too, W&B is switched off
for the rest of the run. Checkpoints and other loggers are not affected either way.

Checkpoints are logged as W&B artifacts (``model-<run id>``, type ``model``, aliases
``latest`` / ``best``; Lightning's ``WandbLogger(log_model=...)``) by default when the run is
online; offline they stay on disk only (one line says so; ``log_model: true`` puts them in the
offline run, and ``wandb sync`` uploads them). At the end of fit
:class:`~bdiff.lit.callbacks.SampleGrid` logs a ``wandb.Table`` of its final samples
(:meth:`AutoWandbLogger.log_sample_table`), one row per sample, sortable by uncertainty.

A run is continued by giving its ``id`` (W&B's ``resume="allow"``, which Lightning's logger always
passes): ``train.py fit --ckpt_path <run>/checkpoints/last.ckpt`` does this by itself
(:class:`bdiff.lit.cli.BdiffCLI`). Offline, W&B writes each part into its own
``wandb/offline-run-<time>-<id>`` folder; ``wandb sync`` uploads the parts of one id as one run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor

from bdiff.wandb_log import WandbMode, finish_broken_run, has_wandb_credentials, new_run, resolve_wandb_mode, sample_table

__all__ = ["AutoWandbLogger", "WandbMode", "has_wandb_credentials", "resolve_wandb_mode"]


class AutoWandbLogger(WandbLogger):
    """``WandbLogger`` that falls back to offline mode when no credentials are found, and that
    never stops training when W&B fails (see the module docstring).

    Args:
        project: W&B project.
        name: run name (W&B picks one if None).
        save_dir: where the ``wandb/`` run folder is written.
        mode: ``online``, ``offline`` or ``disabled``; None chooses automatically.
        tags: run tags.
        log_model: log the ModelCheckpoint files as W&B artifacts: ``auto`` (default) is
            ``True`` for an online run and ``False`` otherwise; ``True`` logs them when fit ends,
            ``"all"`` whenever one is saved (Lightning's ``WandbLogger(log_model=...)``).
        id: the W&B run id: an existing run's continues it (its run folder
            ``<save_dir>/<project>/<id>`` too); None: a new run. A fit resumed with
            ``--ckpt_path`` gets the checkpoint's (:mod:`bdiff.lit.cli`).
    """

    def __init__(
        self,
        project: str = "bdiff",
        name: str | None = None,
        save_dir: str = "runs",
        mode: WandbMode | None = None,
        tags: list[str] | None = None,
        log_model: bool | Literal["auto", "all"] = "auto",
        id: str | None = None,
    ) -> None:
        if log_model not in (True, False, "auto", "all"):
            raise ValueError(f"log_model must be true, false, 'auto' or 'all', got {log_model!r}")
        resolved = resolve_wandb_mode(mode)
        effective = (resolved == "online") if log_model == "auto" else log_model
        if resolved == "offline":
            line = []
            if mode is None and not os.environ.get("WANDB_MODE"):
                line.append("W&B: no credentials found, logging offline (upload later with `wandb sync <run dir>`).")
            if log_model == "auto":
                line.append("W&B offline: checkpoints are not logged as artifacts (they stay in the run's "
                            "checkpoints/ folder; log_model: true adds them to the offline run for `wandb sync`).")
            if line:
                rank_zero_info(" ".join(line))
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(project=project, name=name, save_dir=save_dir, mode=resolved, tags=tags, log_model=effective,
                         id=id)
        self.mode: WandbMode = resolved
        self._run_id: str | None = id  # the first run's id: it names the run folder
        self.failures: list[str] = []  # one line per W&B failure survived, e.g. "log_metrics at step 12: OSError: ..."
        self._switched_off = False

    @property
    def version(self) -> str | None:
        """The id of the run this logger started, which names the run folder ``<save_dir>/<project>/<id>``.

        It stays that id after a failure moved logging to a fresh offline run (whose id differs), so
        checkpoints keep their folder and a resumed fit continues the original run.
        """
        if self._run_id is None and self._experiment is not None:
            self._run_id = getattr(self._experiment, "id", None)
        return self._run_id

    @property
    def log_model(self) -> bool | str:
        """What is logged as artifacts after ``auto`` was resolved: False, True or ``"all"``."""
        return self._log_model

    # -- failure handling --------------------------------------------------------------------------
    @property
    def switched_off(self) -> bool:
        """True once W&B failed twice (or could not even start offline): nothing is logged to W&B any more."""
        return self._switched_off

    def _fall_back(self, what: str, error: BaseException) -> None:
        """After a failure: finish the broken run if it lets us, continue in a new offline run, else switch off."""
        failure = f"{what}: {type(error).__name__}: {error}"
        self.failures.append(failure)
        broken, self._experiment = self._experiment, None
        finish_broken_run(broken)
        if len(self.failures) > 1:  # the offline run we fell back to failed as well
            self._switch_off(f"W&B failed again, in the offline run it fell back to ({failure})")
            return
        init = {k: v for k, v in self._wandb_init.items() if k not in ("id", "resume")}
        try:
            self._experiment = new_run(mode="offline", **{k: v for k, v in init.items() if k != "mode"})
            self._experiment.define_metric("trainer/global_step")
            self._experiment.define_metric("*", step_metric="trainer/global_step", step_sync=True)
        except Exception as e:
            self.failures.append(f"starting an offline run: {type(e).__name__}: {e}")
            self._experiment = None
            self._switch_off(f"W&B failed ({failure}) and an offline run could not be started ({type(e).__name__}: {e})")
            return
        run_dir = os.path.dirname(self._experiment.dir) if getattr(self._experiment, "dir", None) else self.save_dir
        rank_zero_warn(
            f"W&B failed ({failure}). Training continues; W&B now logs offline to {run_dir} "
            f"(upload later with `wandb sync {run_dir}`)."
        )

    def _switch_off(self, reason: str) -> None:
        self._switched_off = True
        try:  # a disabled run accepts every call and does nothing, so code using .experiment keeps working
            self._experiment = new_run(mode="disabled")
        except Exception:
            self._experiment = None
        rank_zero_warn(
            f"{reason}. Training continues with W&B logging switched off for the rest of this run "
            "(checkpoints and other loggers are not affected)."
        )

    def _guard(self, what: str, call: Callable[[], Any]) -> None:
        """Run a W&B call; on an error fall back (offline, then off) and retry it once."""
        if self._switched_off:
            return
        try:
            call()
            return
        except Exception as e:
            self._fall_back(what, e)
        if self._switched_off:
            return
        try:
            call()
        except Exception as e:
            self._fall_back(what, e)

    @property
    def experiment(self) -> Any:
        """The W&B run; if starting it fails, an offline run instead (or a disabled one)."""
        try:
            return WandbLogger.experiment.fget(self)  # type: ignore[attr-defined]
        except Exception as e:
            self._fall_back("starting the W&B run", e)
            return self._experiment

    # -- every call that talks to W&B goes through _guard ------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._guard(f"log_metrics at step {step}", lambda: super(AutoWandbLogger, self).log_metrics(metrics, step))

    def log_hyperparams(self, params: Any) -> None:
        self._guard("log_hyperparams", lambda: super(AutoWandbLogger, self).log_hyperparams(params))

    def log_image(self, key: str, images: list[Any], step: int | None = None, **kwargs: Any) -> None:
        self._guard(f"log_image {key!r} at step {step}",
                    lambda: super(AutoWandbLogger, self).log_image(key, images, step, **kwargs))

    @rank_zero_only
    def log_sample_table(
        self,
        key: str,
        images: Tensor,
        variance: Tensor | None,
        nfe: Tensor,
        critic_logit: Tensor | None = None,
        step: int | None = None,
    ) -> bool:
        """Log :func:`bdiff.wandb_log.sample_table` (one row per sample) under ``key``; True if it was logged
        (rank zero only: None elsewhere).

        images (N,C,H,W) and variance (N,C,H,W) on the [0, 1] image scale, nfe (N,), critic_logit (N,).
        A table that cannot be built (a bug in the data) is skipped with a warning and W&B carries on;
        a failing upload falls back like every other call (offline, then off).
        """
        if self._switched_off:
            return False
        try:
            table = sample_table(images, variance, nfe, critic_logit)
        except Exception as e:
            rank_zero_warn(f"W&B: the samples table {key!r} could not be built ({type(e).__name__}: {e}); "
                           "it is skipped, training and the rest of W&B logging continue.")
            return False
        self._guard(f"log_sample_table {key!r} at step {step}",
                    lambda: super(AutoWandbLogger, self).log_metrics({key: table}, step))
        return not self._switched_off  # the guard logged it (maybe in the fallback run) or switched W&B off

    def log_table(self, *args: Any, **kwargs: Any) -> None:
        self._guard("log_table", lambda: super(AutoWandbLogger, self).log_table(*args, **kwargs))

    def log_text(self, *args: Any, **kwargs: Any) -> None:
        self._guard("log_text", lambda: super(AutoWandbLogger, self).log_text(*args, **kwargs))

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self._guard("after_save_checkpoint", lambda: super(AutoWandbLogger, self).after_save_checkpoint(checkpoint_callback))

    def finalize(self, status: str) -> None:
        self._guard("finalize", lambda: super(AutoWandbLogger, self).finalize(status))
