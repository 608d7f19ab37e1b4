"""The few domain exceptions and the exit codes they map to.

Every error the user can cause or fix ends as one line on stderr and one of these codes;
the traceback is shown only with `--traceback`.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class ExitStatus(IntEnum):
    """Documented exit codes (README, man pages)."""

    OK = 0
    ERROR = 1  # the run failed: bad model, bad input with --on-error fail, export failure
    USAGE = 2  # bad command line (click's own code)
    PARTIAL = 3  # finished, but some records failed (--on-error null)
    INTERRUPTED = 130  # Ctrl-C
    BROKEN_PIPE = 141  # the reader went away (`| head -1`), as the shell reports SIGPIPE


class OnnxpipeError(Exception):
    """An error with a one-line message that says what to do next."""

    exit_status: ExitStatus = ExitStatus.ERROR

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(OnnxpipeError):
    """Options that cannot work together, or a value out of range."""

    exit_status = ExitStatus.USAGE


class MissingExtraError(OnnxpipeError):
    """A command needs an optional dependency group that is not installed."""

    def __init__(self, extra: str, what: str, missing: str | None = None):
        detail = f" ({missing} is missing)" if missing else ""
        super().__init__(f"{what} needs the [{extra}] extra{detail}: install onnxpipe[{extra}]")


def import_extra(extra: str, what: str, module: str) -> Any:
    """MODULE (a module of the optional [EXTRA] extra) imported, or the one-line MissingExtraError
    ("WHAT needs the [EXTRA] extra (X is missing): install onnxpipe[EXTRA]") instead of an ImportError."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(extra, what, missing=module.split(".")[0]) from None


def require_extra(extra: str, what: str, *modules: str) -> None:
    """Fail in one line when a module of an optional extra is missing (import_extra's error): before any
    work starts, not with an ImportError half-way through."""
    for module in modules:
        import_extra(extra, what, module)


class ModelNotFoundError(OnnxpipeError):
    """`-m NAME` is neither an export folder nor an export in the export home."""


class ExportFolderError(OnnxpipeError):
    """An export folder that cannot be used as it is: a broken or tampered manifest, graph, tokenizer or config."""


class SourceError(OnnxpipeError):
    """The checkpoint to export cannot be read (missing, corrupt, unsupported, offline hub)."""


class ExportError(OnnxpipeError):
    """The export itself failed."""


class ValidationError(ExportError):
    """The ONNX graph does not reproduce the PyTorch model within the tolerance."""


class DeviceError(OnnxpipeError):
    """The requested execution provider cannot run on this machine."""


class InputError(OnnxpipeError):
    """A record that cannot be read (malformed JSONL, missing field); names its line."""

    def __init__(self, message: str, line: int | None = None, source: str | None = None):
        where = ""
        if line is not None:
            where = f"{source or '<stdin>'}:{line}: "
        super().__init__(where + message)
        self.line = line
