"""Writing a file so that no reader ever sees half of it: temp file in the same folder, fsync, ``os.replace``.

The folder is fsynced after the rename too, so the new file survives a power loss. Used for
everything bdiff writes that another process may read or that a crash could truncate: checkpoints
(:mod:`bdiff.lit.checkpoint_io`), samples files (:mod:`bdiff.metrics.samples_file`), the
evaluator's feature networks (:mod:`bdiff.metrics.features`) and fitted timestep grids
(:mod:`bdiff.sampling.fitted_grid`). The temporary file is ``.<name>.<random><suffix>`` beside the
target (``os.replace`` is atomic only within one filesystem); it is removed when the write fails,
and only a killed process (SIGKILL, power loss) can leave it behind.

Written by hand: the standard library has no atomic write, and fsspec's transactions stage files
in the system temp folder, whose commit is a copy when that folder is on another filesystem.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

PARTIAL_SUFFIX = ".partial"


def fsync_dir(path: Path) -> None:
    """Make a rename in folder ``path`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _mode_for(target: Path) -> int:
    """The permission bits of ``target`` if it exists, else those a new file gets (0o666 less the umask)."""
    try:
        return target.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = PARTIAL_SUFFIX) -> Iterator[Path]:
    """A temporary path to write; it becomes ``path`` (parents created) only if the block succeeds.

    The block writes and closes the temporary file itself (for writers that take a path, such as
    Lightning's checkpoint IO); it is fsynced and moved into place after the block.

    Example:
        >>> import tempfile, torch
        >>> with tempfile.TemporaryDirectory() as d, atomic_path(f"{d}/w.pt") as tmp:
        ...     torch.save({"w": 1}, tmp)
    """
    target = Path(path)
    if target.is_symlink():  # write through a link (Lightning's save_last="link"), not over it
        target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(target))  # mkstemp makes 0600: keep the file's mode, or what open() would give
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], suffix: str = PARTIAL_SUFFIX) -> Iterator[BinaryIO]:
    """A binary file object that becomes ``path`` (parents created) only if the block succeeds.

    A file object rather than a name, so writers that add an extension to names (``numpy.savez``)
    write exactly here.
    """
    with atomic_path(path, suffix) as tmp, open(tmp, "wb") as f:
        yield f
