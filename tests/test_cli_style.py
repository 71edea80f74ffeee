"""One command-line style for every command: ``--help`` and ``--print_config`` answer, a bad value is one line and exit 2.

The four console commands (``bdiff-train``, ``bdiff-sample``, ``bdiff-evaluate``, ``bdiff-critic``) run in process
through :mod:`bdiff.scripts`, as the installed scripts call them, plus the feature net's ``cache`` command. None of
these paths trains or loads a model: each ends while parsing the command line or opening a named file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bdiff import scripts
from bdiff.console import exit_on_user_error
from tests.conftest import CONFIGS, ROOT

CRITIC_CONFIG = str(CONFIGS / "critic" / "digits.yaml")


def run(command: str, argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run ``bdiff-<command> argv`` in process from the repository root; (exit status, stdout, stderr)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("BDIFF_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", [f"bdiff-{command}", *argv])
    with pytest.raises(SystemExit) as stop:
        getattr(scripts, command)()
    out, err = capsys.readouterr()
    return stop.value.code or 0, out, err.strip()


HELP = {
    "train": (["--help"], "usage: bdiff-train"),
    "sample": (["--help"], "usage: bdiff-sample"),
    "evaluate": (["--help"], "usage: bdiff-evaluate"),
    "critic": (["--help"], "usage: bdiff-critic"),
}
PRINT_CONFIG = {
    "train": (["--print_config"], "max_steps:"),
    "sample": (["--ckpt", "some.ckpt", "--n", "7", "--print_config"], "n: 7"),
    "evaluate": (["--samples", "some.npz", "--print_config"], "samples: some.npz"),
    "critic": (["--config", CRITIC_CONFIG, "--print_config"], "diffusion_ckpt:"),
}
BAD_VALUES = {
    "train --trainer.max_steps abc": ("train", ["--trainer.max_steps", "abc"], "trainer.max_steps"),
    "train, a config file that is not there": ("train", ["fit", "--config", "configs/nothing.yaml"], "nothing.yaml"),
    "sample --n abc": ("sample", ["--ckpt", "some.ckpt", "--n", "abc"], '"n"'),
    "evaluate, a samples file that is not there": ("evaluate", ["--samples", "nothing.npz"], "nothing.npz"),
    "evaluate, an unknown option": ("evaluate", ["--samples", "some.npz", "--bogus", "1"], "--bogus"),
    "critic --trainer.max_steps abc": ("critic", ["--config", CRITIC_CONFIG, "--trainer.max_steps", "abc"],
                                       "trainer.max_steps"),
    "critic --model.lr abc": ("critic", ["fit", "--config", CRITIC_CONFIG, "--model.lr", "abc"], "model.lr"),
    "critic, a diffusion checkpoint that is not there": (  # found once the classes are built, after the seed (and
        # Lightning's "Seed set to" log line, left out here), so after parsing
        "critic", ["--config", CRITIC_CONFIG, "--seed_everything=false", "--data.diffusion_ckpt", "nothing.ckpt"],
        "nothing.ckpt"),
}


@pytest.mark.parametrize("command", sorted(HELP))
def test_help(command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    argv, start = HELP[command]
    code, out, _ = run(command, argv, monkeypatch, capsys)
    assert code == 0 and out.startswith(start), out[:300]


@pytest.mark.parametrize("command", sorted(PRINT_CONFIG))
def test_print_config(command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import yaml

    argv, shows = PRINT_CONFIG[command]
    code, out, _ = run(command, argv, monkeypatch, capsys)
    assert code == 0 and shows in out, out[:300]
    assert isinstance(yaml.safe_load(out), dict)  # a config that --config reads back


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_a_bad_value_is_one_line_and_exit_2(case: str, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    command, argv, names = BAD_VALUES[case]
    code, out, err = run(command, argv, monkeypatch, capsys)
    assert code == 2 and out == "", out[:300]
    assert err and "\n" not in err and names in err, err[:1000]


def test_debug_shows_the_parsers_usage(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("BDIFF_DEBUG", "1")
    monkeypatch.setattr(sys, "argv", ["bdiff-evaluate", "--samples", "some.npz", "--bogus", "1"])
    with pytest.raises(SystemExit):
        scripts.evaluate()
    assert "usage: bdiff-evaluate" in capsys.readouterr().err


def test_feature_cache_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """``python -m bdiff.lit.feature_module cache``: the same style (jsonargparse, --config, --print_config)."""
    import yaml

    from bdiff.lit.feature_module import main

    monkeypatch.delenv("BDIFF_DEBUG", raising=False)

    def cache(*argv: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["feature_module.py", "cache", *argv])
        with pytest.raises(SystemExit) as stop:
            exit_on_user_error(main)
        out, err = capsys.readouterr()
        return stop.value.code or 0, out, err.strip()

    code, out, _ = cache("--arch", "mlp", "--print_config")
    assert code == 0 and yaml.safe_load(out)["arch"] == "mlp"
    (tmp_path / "cache.yaml").write_text(out.replace("max_epochs: 20", "max_epochs: abc"))
    for argv, names in ((["--max-epochs", "abc"], "max_epochs"), (["--arch", "vit"], "arch"),
                        (["--config", str(tmp_path / "cache.yaml")], "max_epochs"),
                        (["--from-ckpt", str(tmp_path / "none.ckpt")], "none.ckpt")):
        code, out, err = cache(*argv)
        assert code == 2 and "\n" not in err and names in err, err


def test_the_installed_command_writes_only_that_line() -> None:
    """End to end (the console script in a fresh process): nothing else reaches stderr, no warning, no usage."""
    installed = Path(sys.executable).parent / "bdiff-train"
    command = [str(installed)] if installed.is_file() else [
        sys.executable, "-c", "import sys; sys.argv[0] = 'bdiff-train'; from bdiff.scripts import train; train()"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env.pop("BDIFF_DEBUG", None)
    done = subprocess.run([*command, "--trainer.max_steps", "abc"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr[-2000:]
