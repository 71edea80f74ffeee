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
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

WandbMode = Literal["online", "offline", "disabled"]


def has_wandb_credentials() -> bool:
    """True when an API key is configured (env var or ~/.netrc from ``wandb login``)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1])
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def resolve_wandb_mode(mode: WandbMode | None) -> WandbMode:
    """Pick the W&B mode: env WANDB_MODE > explicit ``mode`` > credentials (online) > offline."""
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled", "dryrun"):
        return "offline" if env == "dryrun" else env  # type: ignore[return-value]
    if mode is not None:
        return mode
    return "online" if has_wandb_credentials() else "offline"


def _new_run(**init: Any) -> Any:
    """``wandb.init`` for a fallback run. It becomes the current ``wandb.run`` (so ``wandb.finish()``
    ends it as usual) unless a broken run could not be finished and still holds that place."""
    import wandb

    return wandb.init(**init, **({"reinit": "create_new"} if wandb.run is not None else {}))


class AutoWandbLogger(WandbLogger):
    """``WandbLogger`` that falls back to offline mode when no credentials are found, and that
    never stops training when W&B fails (see the module docstring).

    Args:
        project: W&B project.
        name: run name (W&B picks one if None).
        save_dir: where the ``wandb/`` run folder is written.
        mode: ``online``, ``offline`` or ``disabled``; None chooses automatically.
        tags: run tags.
    """

    def __init__(
        self,
        project: str = "bdiff",
        name: str | None = None,
        save_dir: str = "runs",
        mode: WandbMode | None = None,
        tags: list[str] | None = None,
    ) -> None:
        resolved = resolve_wandb_mode(mode)
        if resolved == "offline" and mode is None and not os.environ.get("WANDB_MODE"):
            rank_zero_info("W&B: no credentials found, logging offline (upload later with `wandb sync <run dir>`).")
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(project=project, name=name, save_dir=save_dir, mode=resolved, tags=tags)
        self.failures: list[str] = []  # one line per W&B failure survived, e.g. "log_metrics at step 12: OSError: ..."
        self._switched_off = False

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
        if broken is not None:
            try:
                broken.finish(exit_code=1)
            except Exception:
                pass
        if len(self.failures) > 1:  # the offline run we fell back to failed as well
            self._switch_off(f"W&B failed again, in the offline run it fell back to ({failure})")
            return
        init = {k: v for k, v in self._wandb_init.items() if k not in ("id", "resume")}
        try:
            self._experiment = _new_run(mode="offline", **{k: v for k, v in init.items() if k != "mode"})
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
            self._experiment = _new_run(mode="disabled")
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

    def log_table(self, *args: Any, **kwargs: Any) -> None:
        self._guard("log_table", lambda: super(AutoWandbLogger, self).log_table(*args, **kwargs))

    def log_text(self, *args: Any, **kwargs: Any) -> None:
        self._guard("log_text", lambda: super(AutoWandbLogger, self).log_text(*args, **kwargs))

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self._guard("after_save_checkpoint", lambda: super(AutoWandbLogger, self).after_save_checkpoint(checkpoint_callback))

    def finalize(self, status: str) -> None:
        self._guard("finalize", lambda: super(AutoWandbLogger, self).finalize(status))
