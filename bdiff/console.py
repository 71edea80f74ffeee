"""What every bdiff command shares: its program name, and bad input ending in one line with exit status 2.

A bad option on the command line (:class:`ArgumentParser`, or :class:`OneLineErrors` mixed into
another jsonargparse parser) and a user error raised while running (:func:`exit_on_user_error`)
both end in one line ``error: <message>`` on stderr and exit status 2, as argparse's own last line
does. ``--debug`` on the command line or the environment variable ``BDIFF_DEBUG=1`` shows the
parser's usage or the full traceback instead.

Imports no command, so every command (and the console scripts in :mod:`bdiff.scripts`) can use it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import jsonargparse

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)  # what bdiff raises for bad files, recipes and values
DEBUG_FLAG, DEBUG_ENV = "--debug", "BDIFF_DEBUG"


def program_name(command: str, module: str) -> str:
    """``command`` when run as the installed console script (``bdiff-sample``), else ``python -m <module>``."""
    return command if Path(sys.argv[0]).name == command else f"python -m {module}"


def one_line(message: str) -> str:
    """``message`` with every run of whitespace (newlines included) turned into one space."""
    return " ".join(str(message).split())


def fail(message: str) -> NoReturn:
    """Print ``message`` on stderr and exit with status 2."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """True if ``--debug`` is on the command line or ``BDIFF_DEBUG`` is set (not empty or 0)."""
    argv = sys.argv[1:] if argv is None else argv
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def exit_on_user_error(main: Callable[[], object]) -> None:
    """Run ``main()``; a user error (:data:`USER_ERRORS`) ends in one line ``error: <message>`` and exit 2.

    With ``--debug`` or ``BDIFF_DEBUG=1`` the error propagates with its traceback.
    """
    try:
        main()
    except USER_ERRORS as e:
        if debug_requested():
            raise
        fail("error: " + one_line(str(e)))


class OneLineErrors:
    """Mixin for a jsonargparse parser: a parse error is one line ``error: <message> (see <prog> --help)``, exit 2.

    Parsers jsonargparse builds for its own checks (``exit_on_error=False``) still raise, and
    ``--debug`` / ``BDIFF_DEBUG=1`` / ``JSONARGPARSE_DEBUG`` give jsonargparse's usage or traceback.
    """

    exit_on_error: bool
    prog: str

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or debug_requested() or os.environ.get("JSONARGPARSE_DEBUG", "").lower() == "true":
            super().error(message, ex)  # type: ignore[misc]
        parser: Any = getattr(ex, "subcommand_parser", None) or self
        fail(f"error: {one_line(message)} (see {parser.prog.replace(' [options]', '')} --help)")


class ArgumentParser(OneLineErrors, jsonargparse.ArgumentParser):
    """jsonargparse's parser with one-line errors (:class:`OneLineErrors`)."""
