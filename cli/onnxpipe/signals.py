"""Signals and the standard streams, set up by the CLI entry points before anything else runs.

Only `onnxpipe` (the console script and `python -m onnxpipe`) calls `install()`; importing the
package changes nothing, so a program that uses the Python API keeps its own handlers.

Two phases:
- start-up (imports, parsing the command line): SIGINT and SIGTERM end the process at once with
  one line on stderr and 130 or 143. Nothing has been written yet, so there is nothing to clean
  up, and no KeyboardInterrupt can surface as a traceback from inside an import or as click's
  "Aborted!".
- running (inside a command, see `running()`): SIGINT raises KeyboardInterrupt and SIGTERM raises
  Terminated, so `finally` blocks run (temporary export folders, output files); the root command
  turns them into the same line and exit status.

The handlers are installed even when the parent ignored the signal (a background job of a
non-interactive shell inherits SIGINT as ignored): a signal sent to onnxpipe ends it.

A standard stream that is closed (`<&-`, `>&-`, `2>&-`) gets /dev/null on its descriptor, so a
file opened later can never land on descriptor 0, 1 or 2 and receive stray output. stdin and
stdout stay marked closed (reading or writing them is an error that says so); a closed stderr
just discards the messages, so the run goes on and its exit status still tells the outcome.
"""

from __future__ import annotations

import _signal  # not `signal`: it imports enum, ~10 ms of start-up in which Ctrl-C would not be ours
import errno
import io
import os
import sys

INTERRUPTED = 130
TERMINATED = 143  # 128 + SIGTERM, what the shell reports for a process killed by SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a command ran; handled like Ctrl-C, with its own exit status."""


_state: dict = {"running": False, "received": None}


def install() -> None:
    """Fill closed standard descriptors, then take SIGINT and SIGTERM (see the module docstring)."""
    _fill_closed_descriptors()
    for signum in (_signal.SIGINT, _signal.SIGTERM):
        try:
            _signal.signal(signum, _on_signal)
        except (OSError, ValueError):  # not the main thread, or an exotic platform
            pass


class running:
    """While a command runs, signals raise (KeyboardInterrupt / Terminated) so cleanups run."""

    def __enter__(self) -> None:
        self._previous = _state["running"]
        _state["running"] = True

    def __exit__(self, *exc) -> None:
        _state["running"] = self._previous


def interrupt_of(exc: BaseException) -> BaseException | None:
    """The interrupt behind EXC, if a signal caused it.

    A KeyboardInterrupt raised inside a C extension's module init comes out as ImportError
    ("initialization failed"), so the signal handler's record is checked too.
    """
    if isinstance(exc, KeyboardInterrupt):
        return exc
    received = _state["received"]
    if received is not None:
        return Terminated() if received == _signal.SIGTERM else KeyboardInterrupt()
    return None


def message(exc: BaseException) -> tuple[str, int]:
    """The stderr line and exit status for an interrupt."""
    if isinstance(exc, Terminated):
        return "onnxpipe: terminated", TERMINATED
    return "onnxpipe: interrupted", INTERRUPTED


def _on_signal(signum: int, frame) -> None:
    terminated = signum == _signal.SIGTERM
    _state["received"] = signum
    if _state["running"]:
        raise Terminated() if terminated else KeyboardInterrupt()
    line, status = message(Terminated() if terminated else KeyboardInterrupt())
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        pass
    os._exit(status)


class _ClosedRaw(io.RawIOBase):
    """The raw stream behind a closed stdin or stdout: every use fails with EBADF, once.

    After the error was reported (`discard()`), writes are swallowed, so the interpreter's final
    flush of stdout at exit cannot fail a second time.
    """

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.discarding = False

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        raise OSError(errno.EBADF, f"{self.name} is closed")

    def write(self, b) -> int:
        if self.discarding:
            return len(b)
        raise OSError(errno.EBADF, f"{self.name} is closed")


def is_closed(stream) -> bool:
    """True for a standard stream that was closed when onnxpipe started."""
    return stream is None or isinstance(getattr(stream, "_onnxpipe_raw", None), _ClosedRaw)


def redirect_to_devnull(stream: object) -> None:
    """Point STREAM's descriptor at /dev/null, so later writes and the interpreter's final flush succeed."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, getattr(stream, "fileno")())  # noqa: B009 (any stream; None when it was closed)
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def discard_stdout() -> None:
    """After a write error on stdout was reported: make every later write and the final flush succeed."""
    redirect_to_devnull(sys.stdout)
    raw = getattr(sys.stdout, "_onnxpipe_raw", None)
    if isinstance(raw, _ClosedRaw):
        raw.discarding = True


def _fill_closed_descriptors() -> None:
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        try:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        except OSError:
            pass
        if name == "stderr":
            sys.stderr = open(os.devnull, "w", encoding="utf-8")  # messages go nowhere; the run goes on
        else:
            raw = _ClosedRaw(name)
            # typeshed's TextIOWrapper wants a buffer with a `name`; BufferedRWPair has none, and TextIOWrapper does not need it
            pair = io.BufferedRWPair(raw, raw)
            stream = io.TextIOWrapper(pair, encoding="utf-8", line_buffering=True)  # type: ignore[type-var]
            stream._onnxpipe_raw = raw  # type: ignore[attr-defined]
            setattr(sys, name, stream)
