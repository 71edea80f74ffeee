"""Console commands on the PATH (issue 16): ``bdiff-train``, ``bdiff-sample``, ``bdiff-evaluate``, ``bdiff-critic``."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from bdiff import scripts
from tests.conftest import CONFIGS, ROOT

COMMANDS = {"bdiff-train": "train", "bdiff-sample": "sample", "bdiff-evaluate": "evaluate", "bdiff-critic": "critic"}


def test_pyproject_declares_the_four_commands() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert declared == {name: f"bdiff.scripts:{func}" for name, func in COMMANDS.items()}
    for target in declared.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))


def _help(*cmd: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_bdiff_sample_takes_the_options_of_python_m_bdiff_sample() -> None:
    """The installed command if there is one (``pip install -e .``), else its entry point under that name."""
    installed = Path(sys.executable).parent / "bdiff-sample"
    as_command = (str(installed),) if installed.is_file() else (
        sys.executable, "-c", "import sys; sys.argv[0] = 'bdiff-sample'; from bdiff.scripts import sample; sample()")
    command_help = _help(*as_command, "--help")
    module_help = _help(sys.executable, "-m", "bdiff.sample", "--help")
    assert command_help.startswith("usage: bdiff-sample ") and module_help.startswith("usage: python -m bdiff.sample ")

    def options(text: str) -> list[str]:
        return sorted({w.split("=")[0].strip("[],") for w in text.split() if w.lstrip("[").startswith("--")})

    assert options(command_help) == options(module_help)
    assert "--wandb-project" in options(command_help)


def test_bdiff_train_uses_the_default_config_of_train_py(monkeypatch: pytest.MonkeyPatch) -> None:
    import train  # the repository's train.py

    from bdiff.lit import cli

    seen: list[Path] = []
    monkeypatch.setattr(cli, "main", lambda default_config, argv=None, run=True: seen.append(Path(default_config)))
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["bdiff-train"])
    scripts.train()
    assert seen == [train.DEFAULT_CONFIG]
    assert scripts.default_train_config() == train.DEFAULT_CONFIG


def test_bdiff_train_outside_the_repository_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from bdiff.lit import cli

    monkeypatch.setattr(cli, "main", lambda *a, **k: pytest.fail("must not start LightningCLI"))
    monkeypatch.setattr(scripts, "REPO_ROOT", tmp_path / "site-packages")  # installed elsewhere, not editable
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["bdiff-train"])
    with pytest.raises(SystemExit) as stop:
        scripts.train()
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pass --config" in err and "repository root" in err and str(tmp_path) in err


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        ("train", ["fit", "--config", "configs/mnist.yaml"]),
        ("sample", ["--ckpt", "last.ckpt", "--sampler", "configs/sampler/ddim.yaml"]),
        ("critic", ["fit", "--config=configs/critic/digits.yaml"]),
        ("critic", ["fit", "--config", str(CONFIGS / "critic" / "digits.yaml"),
                    "--data.sampler=configs/sampler/x.yaml"]),
    ],
)
def test_a_missing_config_file_is_named_in_one_line(
    command: str, argv: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)  # outside the repository: configs/ is not here
    monkeypatch.setattr(sys, "argv", [f"bdiff-{command}", *argv])
    with pytest.raises(SystemExit) as stop:
        getattr(scripts, command)()
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"bdiff-{command}: config file 'configs/")
    assert "repository root" in err


def test_a_config_missing_deep_inside_a_command_is_named_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A default path inside a config (the critic's data.sampler) is only read once the command runs."""

    def needs_a_recipe() -> None:
        from bdiff.sampling.recipe import load_recipe

        load_recipe("configs/sampler/dpmpp.yaml")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["bdiff-critic"])
    with pytest.raises(SystemExit) as stop:
        scripts._run("bdiff-critic", needs_a_recipe)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'configs/sampler/dpmpp.yaml' does not exist" in err and "repository root" in err

    def other_missing_file() -> None:
        open(tmp_path / "data" / "images.npz")

    monkeypatch.delenv("BDIFF_DEBUG", raising=False)
    with pytest.raises(SystemExit) as stop:  # not a config: a user error like any other, the file named
        scripts._run("bdiff-critic", other_missing_file)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "\n" not in err and err.startswith("error: ") and "images.npz" in err
    assert "repository root" not in err
