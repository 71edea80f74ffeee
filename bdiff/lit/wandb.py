"""Weights & Biases logger that works with or without credentials.

Mode is chosen in this order: ``WANDB_MODE`` in the environment (so
``WANDB_MODE=disabled`` always wins), then the ``mode`` argument, then online
if an API key is configured (``WANDB_API_KEY`` or a netrc entry from
``wandb login``), else offline with a one-line hint to ``wandb sync`` later.
Lightning's ``WandbLogger(offline=True)`` sets ``WANDB_MODE`` process-wide and
never unsets it; passing ``mode=`` to ``wandb.init`` avoids that leak.
"""

from __future__ import annotations

import netrc
import os
from typing import Literal

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

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


class AutoWandbLogger(WandbLogger):
    """``WandbLogger`` that falls back to offline mode when no credentials are found.

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
