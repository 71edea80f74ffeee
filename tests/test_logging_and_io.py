"""W&B mode selection, offline runs, atomic checkpoint writes, the preview sampler."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bdiff.lit.checkpoint_io import AtomicCheckpointIO
from bdiff.lit.wandb import AutoWandbLogger, resolve_wandb_mode


def test_wandb_mode_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("online") == "disabled"  # the environment always wins
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_wandb_mode(None) == "offline"  # no credentials: offline, never a prompt
    assert resolve_wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode(None) == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert resolve_wandb_mode(None) == "online"


def test_offline_run_is_written_locally(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    import wandb

    wandb.finish()  # Lightning's WandbLogger reuses a run left open by an earlier test
    logger = AutoWandbLogger(project="test", save_dir=str(tmp_path))
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.log_hyperparams({"config": {"model": {"lr": 1e-3}}})
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    assert run_dir.name.startswith("offline-run-")
    assert str(run_dir).startswith(str(tmp_path))
    import os

    assert os.environ.get("WANDB_MODE") is None  # unlike WandbLogger(offline=True), nothing leaks


def test_atomic_checkpoint_write_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def crash(self, checkpoint, target, storage_options=None):
        Path(target).write_bytes(b"half a checkpoint")  # Lightning's write stops half-way
        raise OSError("disk full")

    from lightning.pytorch.plugins.io import TorchCheckpointIO

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", crash)
    with pytest.raises(OSError):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left behind


def test_atomic_file_replaces_only_after_a_complete_write(tmp_path: Path) -> None:
    """bdiff.files: a failed block leaves the old file and no temporary; a good one replaces it (parents made)."""
    from bdiff.files import atomic_file

    path = tmp_path / "cache" / "grid.npz"
    with atomic_file(path) as f:
        f.write(b"first")
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic_file(path) as f:
            f.write(b"second, but only ha")
            raise RuntimeError("stopped half-way")
    assert path.read_bytes() == b"first" and [p.name for p in path.parent.iterdir()] == ["grid.npz"]
    with atomic_file(path) as f:
        f.write(b"second")
    assert path.read_bytes() == b"second" and [p.name for p in path.parent.iterdir()] == ["grid.npz"]


def test_atomic_file_keeps_the_mode_and_writes_through_a_link(tmp_path: Path) -> None:
    """A replaced file keeps its permission bits, a new one gets open()'s (not mkstemp's 0600), and a
    symlink (Lightning's save_last="link") stays a link to the rewritten file."""
    import os

    from bdiff.files import atomic_file

    new = tmp_path / "new.bin"
    with atomic_file(new) as f:
        f.write(b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert new.stat().st_mode & 0o777 == 0o666 & ~umask
    new.chmod(0o640)
    with atomic_file(new) as f:
        f.write(b"y")
    assert new.stat().st_mode & 0o777 == 0o640
    link = tmp_path / "last.ckpt"
    link.symlink_to(new.name)
    with atomic_file(link) as f:
        f.write(b"z")
    assert link.is_symlink() and new.read_bytes() == b"z"
