"""Weights & Biases helpers that need no Lightning: mode choice, the per-sample table, a safe run.

* :func:`resolve_wandb_mode`: ``WANDB_MODE`` in the environment, else the ``mode`` asked for,
  else online when an API key is configured, else offline (never a login prompt).
* :func:`sample_table`: a ``wandb.Table`` with one row per sample (image, uncertainty map,
  per-sample uncertainty, NFE, critic logit when a critic was used), so a user sorts the
  samples by uncertainty in the W&B UI.
* :class:`SafeRun`: the W&B run of a command-line tool (``bdiff-sample``). Like
  :class:`bdiff.lit.wandb.AutoWandbLogger` it never stops the tool: a failing call warns once
  and continues in a fresh offline run; a second failure switches W&B off.

The training logger (:mod:`bdiff.lit.wandb`) builds on the first two.
"""

from __future__ import annotations

import math
import netrc
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from bdiff.metrics.usefulness import per_sample_uncertainty  # the one reducer the filtering metrics use too

WandbMode = Literal["online", "offline", "disabled"]

#: columns of :func:`sample_table`, in order (the uncertainty and critic columns only when given)
TABLE_COLUMNS = ("index", "image", "uncertainty_map", "uncertainty", "nfe", "critic_logit")


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


def new_run(**init: Any) -> Any:
    """``wandb.init`` for a new or fallback run. It becomes the current ``wandb.run`` (so ``wandb.finish()``
    ends it as usual) unless a broken run could not be finished and still holds that place."""
    import wandb

    return wandb.init(**init, **({"reinit": "create_new"} if wandb.run is not None else {}))


# -- the per-sample table ------------------------------------------------------------------------


def _upscale_factor(height: int, min_size: int) -> int:
    """Nearest-neighbour factor that shows an image at least ``min_size`` pixels high (8x8 digits are tiny)."""
    return max(1, math.ceil(min_size / max(1, height)))


def _to_uint8_hwc(x: Tensor, factor: int) -> Any:
    """(C,H,W) in [0, 1] -> numpy uint8 (H',W') for one channel or (H',W',C) otherwise, upscaled by ``factor``."""
    if factor > 1:
        x = F.interpolate(x[None].float(), scale_factor=factor, mode="nearest")[0]
    x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def uncertainty_maps(variance: Tensor) -> Tensor:
    """Per-pixel std maps on one scale shared by the batch: variance (N,C,H,W) -> (N,1,H,W) in [0, 1].

    As in :func:`bdiff.viz.uncertainty_grids`: std averaged over channels, black is the batch's least
    uncertain pixel, white its 99th percentile and above, so maps compare across rows.
    """
    std = variance.float().clamp_min(0).sqrt().mean(1, keepdim=True)
    flat = std.flatten()
    lo = flat.min()
    hi = torch.quantile(flat[: 2**24], 0.99) if flat.numel() > 1 else flat.max()  # quantile's input limit
    return ((std - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)


def sample_table(
    images: Tensor,
    variance: Tensor | None,
    nfe: Tensor,
    critic_logit: Tensor | None = None,
    first_index: int = 0,
    min_size: int = 64,
) -> Any:
    """A ``wandb.Table`` with one row per sample; sort it by ``uncertainty`` in the W&B UI.

    Args:
        images: (N,C,H,W) samples on the [0, 1] scale (C = 1 or 3).
        variance: (N,C,H,W) per-pixel variance on the same [0, 1] scale, or None (no uncertainty:
            the ``uncertainty_map`` and ``uncertainty`` columns are left out).
        nfe: (N,) denoiser calls per sample.
        critic_logit: (N,) the critic's logit on each finished image (higher: more like the real
            data), or None when no critic was used (the column is left out).
        first_index: global index of the first row (sample i of a run depends only on (seed, i)).
        min_size: images and maps are upscaled (nearest) to at least this many pixels high.

    Columns: ``index`` (int), ``image`` and ``uncertainty_map`` (``wandb.Image``; the maps share
    one scale, see :func:`uncertainty_maps`), ``uncertainty`` (mean per-pixel variance, float),
    ``nfe`` (int), ``critic_logit`` (float).

    Example:
        >>> table = sample_table(torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8) * 1e-3, torch.full((4,), 20))
        >>> table.columns
        ['index', 'image', 'uncertainty_map', 'uncertainty', 'nfe']
    """
    import wandb

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"sample_table needs images (N,C,H,W) with C = 1 or 3, got {tuple(images.shape)}")
    n = images.shape[0]
    if variance is not None and variance.shape != images.shape:
        raise ValueError(f"variance {tuple(variance.shape)} must have the images' shape {tuple(images.shape)}")
    if tuple(nfe.shape) != (n,):
        raise ValueError(f"nfe must have shape ({n},), got {tuple(nfe.shape)}")
    if critic_logit is not None and tuple(critic_logit.shape) != (n,):
        raise ValueError(f"critic_logit must have shape ({n},), got {tuple(critic_logit.shape)}")
    columns = ["index", "image"]
    if variance is not None:
        columns += ["uncertainty_map", "uncertainty"]
        maps, scores = uncertainty_maps(variance), per_sample_uncertainty(variance.float())
    columns.append("nfe")
    if critic_logit is not None:
        columns.append("critic_logit")
    factor = _upscale_factor(images.shape[2], min_size)
    rows = []
    for i in range(n):
        row: list[Any] = [first_index + i, wandb.Image(_to_uint8_hwc(images[i], factor))]
        if variance is not None:
            row += [wandb.Image(_to_uint8_hwc(maps[i], factor)), float(scores[i])]
        row.append(int(round(float(nfe[i]))))
        if critic_logit is not None:
            row.append(float(critic_logit[i]))
        rows.append(row)
    return wandb.Table(columns=columns, data=rows)


# -- a run for command-line tools ----------------------------------------------------------------


def finish_broken_run(run: Any) -> None:
    """Finish a run that just failed, if it lets us (a failing ``finish`` is ignored); None is a no-op."""
    if run is None:
        return
    try:
        run.finish(exit_code=1)
    except Exception:
        pass


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class SafeRun:
    """A W&B run for a command-line tool that never stops the tool (see the module docstring).

    Args:
        project: W&B project.
        dir: where the ``wandb/`` run folder is written.
        mode: ``online``, ``offline`` or ``disabled``; None chooses (:func:`resolve_wandb_mode`).
        **init: more ``wandb.init`` arguments (``job_type``, ``config``, ``name``, ``tags``).

    Example:
        >>> run = SafeRun("bdiff", dir="/tmp", mode="disabled", job_type="sample")
        >>> run.log(lambda: {"nfe_mean": 20.0}, "metrics")
        True
        >>> run.finish()
    """

    def __init__(self, project: str, dir: str | os.PathLike[str], mode: WandbMode | None = None, **init: Any) -> None:
        self.mode = resolve_wandb_mode(mode)
        self.failures: list[str] = []  # one line per failure survived
        self.switched_off = False
        os.makedirs(dir, exist_ok=True)
        self._init = {"project": project, "dir": os.fspath(dir), **init}
        self.run: Any = None
        try:
            self.run = new_run(mode=self.mode, **self._init)
        except Exception as e:
            self._fall_back("starting the W&B run", e)

    @property
    def id(self) -> str | None:
        """The run id (None when W&B is switched off)."""
        return None if self.switched_off or self.run is None else getattr(self.run, "id", None)

    @property
    def offline(self) -> bool:
        return not self.switched_off and getattr(getattr(self.run, "settings", None), "mode", "") == "offline"

    @property
    def run_dir(self) -> str | None:
        """The run's folder (``.../wandb/offline-run-...``), or None."""
        files = getattr(self.run, "dir", None) if not self.switched_off else None
        return os.path.dirname(files) if files else None

    def _fall_back(self, what: str, error: BaseException) -> None:
        """After a failure: finish the broken run if it lets us, continue offline, else switch off."""
        failure = f"{what}: {type(error).__name__}: {error}"
        self.failures.append(failure)
        broken, self.run = self.run, None
        finish_broken_run(broken)
        if len(self.failures) == 1 and self.mode != "disabled":
            try:
                self.run = new_run(mode="offline", **self._init)
                _warn(f"W&B failed ({failure}); W&B now logs offline to {self.run_dir} "
                      f"(upload later with `wandb sync {self.run_dir}`).")
                return
            except Exception as e:
                self.failures.append(f"starting an offline run: {type(e).__name__}: {e}")
                failure += f"; an offline run could not be started either ({type(e).__name__}: {e})"
        self.run, self.switched_off = None, True
        _warn(f"W&B failed ({failure}); W&B logging is switched off, everything else is unaffected.")

    def log(self, data: Callable[[], Mapping[str, Any]], what: str) -> bool:
        """``run.log(data())``; on an error fall back (offline, then off) and retry once. True if logged.

        ``data`` is called inside the guard, so building a table or image that fails is survived too.
        """
        for _ in range(2):
            if self.switched_off or self.run is None:
                return False
            try:
                self.run.log(dict(data()))
                return True
            except Exception as e:
                self._fall_back(what, e)
        return False

    def finish(self, exit_code: int = 0) -> None:
        """Finish the run (never raises)."""
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as e:
            self.failures.append(f"finish: {type(e).__name__}: {e}")
            _warn(f"W&B could not finish its run ({type(e).__name__}: {e}); what was logged is in {self.run_dir}.")
