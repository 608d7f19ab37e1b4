"""The one stderr console. stdout is for results only; everything else comes through here."""

from __future__ import annotations

import os
import sys
from functools import lru_cache

VERBOSITY = {"level": 0}  # -1 quiet, 0 normal, 1+ verbose; set once by the root command


@lru_cache(maxsize=1)
def stderr():
    from rich.console import Console

    plain = bool(os.environ.get("NO_COLOR")) or not sys.stderr.isatty()
    return Console(stderr=True, no_color=plain, highlight=False, soft_wrap=True)


def info(message: str) -> None:
    """A status line (suppressed by -q)."""
    if VERBOSITY["level"] >= 0:
        _print(message)


def debug(message: str) -> None:
    """Shown only with -v."""
    if VERBOSITY["level"] >= 1:
        _print(message, style="dim")


def warn(message: str) -> None:
    """Warnings are shown even with -q: they say something went differently than asked."""
    _print(f"onnxpipe: warning: {message}", style="yellow")


def _print(message: str, style: str | None = None) -> None:
    """stderr is best effort: a full or broken stderr never fails a run that can succeed."""
    try:
        stderr().print(message, markup=False, style=style)
    except (OSError, ValueError):
        _discard_stderr()


def _discard_stderr() -> None:
    from onnxpipe.signals import redirect_to_devnull

    redirect_to_devnull(sys.stderr)
