"""The console commands ``pip install`` puts on the PATH (``[project.scripts]`` in pyproject.toml).

    bdiff-train      == python train.py                       (LightningCLI; default: configs/digits.yaml)
    bdiff-sample     == python -m bdiff.sample
    bdiff-evaluate   == python -m bdiff.evaluate
    bdiff-critic     == python -m bdiff.lit.critic_module

Each takes exactly the options of its ``python -m`` form (it calls the same ``main``). The
configs live in the repository's ``configs/`` folder, not in the installed package: a command
that needs one it cannot find (started outside the repository, or a mistyped path) says so in
one line and exits with status 2 instead of printing a parser's usage or a traceback.

Every command (and its ``python`` form) ends a bad option, and every error it raises for bad input
-- a ValueError or FileNotFoundError naming the file, recipe key or value -- in one line
``error: <message>`` with exit status 2 (:mod:`bdiff.console`). The environment variable
``BDIFF_DEBUG=1`` (or ``--debug`` for ``bdiff-sample`` and ``bdiff-evaluate``) shows the full
traceback instead.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from bdiff.console import exit_on_user_error, fail

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout, for a source or editable install
DEFAULT_TRAIN_CONFIG = Path("configs") / "digits.yaml"
CONFIG_SUFFIXES = (".yaml", ".yml")
CONFIG_PATH = re.compile(r"(?:^|[\s'\"/])configs/[^\s'\"]*\.ya?ml")  # a configs/....yaml path in an error message


def default_train_config(roots: Sequence[Path] | None = None) -> Path | None:
    """``configs/digits.yaml`` under the current folder, else under the checkout this package runs from (an
    editable install: the file ``train.py`` uses); None if neither has it."""
    for root in roots if roots is not None else (Path.cwd(), REPO_ROOT):
        candidate = root / DEFAULT_TRAIN_CONFIG
        if candidate.is_file():
            return candidate.resolve()
    return None


def _config_values(argv: Sequence[str]) -> list[str]:
    """Values of ``--config``/``-c`` and any other argument that names a .yaml/.yml file."""
    values = []
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("-") and "=" in arg else arg
        if arg in ("-c", "--config") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("-") and "=" not in arg:
            continue
        if value.endswith(CONFIG_SUFFIXES) and value not in values:
            values.append(value)
    return values


def missing_config_message(command: str, argv: Sequence[str]) -> str | None:
    """One line naming the first config file in ``argv`` that does not exist, or None if all exist."""
    for value in _config_values(argv):
        if not Path(value).expanduser().is_file():
            return (f"{command}: config file {value!r} not found (looked in {Path.cwd()}); run from the bdiff "
                    "repository root, where configs/ is, or pass the file's full path")
    return None


def _run(command: str, main: Callable[[], object]) -> None:
    """Run ``main`` after checking the config files named on the command line; a config file missing
    later on (e.g. a default path inside a config) is reported in one line too, and so is every other
    user error (:func:`~bdiff.console.exit_on_user_error`)."""
    message = missing_config_message(command, sys.argv[1:])
    if message:
        fail(message)

    def checked() -> None:
        try:
            main()
        except FileNotFoundError as e:
            if not CONFIG_PATH.search(f"{e.filename or ''} {e}"):
                raise
            fail(f"{command}: {e} (looked in {Path.cwd()}); run from the bdiff repository root, where configs/ is, "
                  "or pass the file's full path")

    exit_on_user_error(checked)


def train() -> None:
    """``bdiff-train``: ``python train.py`` (LightningCLI ``fit`` by default, configs/digits.yaml by default)."""
    from bdiff.lit.cli import main

    args = sys.argv[1:]
    wants_help = any(a in ("-h", "--help") for a in args)
    has_config = any(a in ("-c", "--config") or a.startswith("--config=") for a in args)
    default = default_train_config()
    if default is None and not has_config and not wants_help:
        fail(f"bdiff-train: no --config given and the default {DEFAULT_TRAIN_CONFIG} is not in {Path.cwd()}; "
              f"pass --config <file> or run from the bdiff repository root (e.g. bdiff-train fit --config "
              f"configs/mnist.yaml there)")
    _run("bdiff-train", lambda: main(default if default is not None else DEFAULT_TRAIN_CONFIG))


def sample() -> None:
    """``bdiff-sample``: ``python -m bdiff.sample``."""
    from bdiff.sample import main

    _run("bdiff-sample", main)


def evaluate() -> None:
    """``bdiff-evaluate``: ``python -m bdiff.evaluate``."""
    from bdiff.evaluate import main

    _run("bdiff-evaluate", main)


def critic() -> None:
    """``bdiff-critic``: ``python -m bdiff.lit.critic_module``."""
    from bdiff.lit.critic_module import main

    _run("bdiff-critic", main)
