"""Checkpoint writing that never leaves a half-written file under a checkpoint's name.

Lightning's ``TorchCheckpointIO`` serialises to memory and writes through an fsspec
transaction whose temporary file lives in the system temp folder: committing it is a
``shutil.move``, which is a copy (not atomic) when that folder is on another filesystem,
and nothing is fsynced. We write to a temporary file in the checkpoint's own folder,
fsync it, ``os.replace`` it into place (atomic on POSIX and Windows) and fsync the
folder, so readers see the old file or the new one, also after a crash or power loss.

A process killed mid-write (SIGKILL, OOM killer) leaves its temporary file behind as
``.<name>.<random>.partial``. Lightning never takes it for a checkpoint (``ckpt_path="last"``
only considers ``last*.ckpt``), and the next successful save of the same name removes it.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from bdiff.files import PARTIAL_SUFFIX, atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with write-to-temp-then-rename saves (local paths)."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        target = Path(path)
        if "://" in str(path):  # remote filesystems: keep Lightning's own behaviour
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(target) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)
        prefix = glob.escape(f".{target.name}.")
        for stale in target.parent.glob(f"{prefix}*{PARTIAL_SUFFIX}"):  # left by a writer that was killed
            stale.unlink(missing_ok=True)
