"""Output: one line (or one matrix row) per record, written in input order, flushed per batch.

Writers write bytes to a binary stream so that the encoding is ours (UTF-8, whatever the locale).
A BrokenPipeError from a write is left to propagate: the root command turns it into a quiet exit.
"""

from __future__ import annotations

import json
import os
from typing import IO, Any

from onnxpipe.errors import OnnxpipeError, UsageError
from onnxpipe.stream.records import Formatter, Result

FORMATS = ("text", "jsonl", "tsv")


def escape_text(text: str) -> str:
    """Keep a result on one line, reversibly: backslash, newline and CR become \\\\, \\n, \\r."""
    if "\\" in text or "\n" in text or "\r" in text:
        text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    return text


def unescape_text(text: str) -> str:
    """The inverse of escape_text (and of the TSV escaping)."""
    out, i = [], 0
    table = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in table:
            out.append(table[text[i + 1]])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def escape_cell(text: str) -> str:
    text = escape_text(text)
    return text.replace("\t", "\\t") if "\t" in text else text


class OutputError(OnnxpipeError):
    """Results cannot be written: the run stops (what was flushed before stays written)."""

    def __init__(self, stream: Any, exc: OSError):
        name = getattr(stream, "name", None)
        where = "stdout" if name in (None, "<stdout>", 1) or not isinstance(name, str) else name
        super().__init__(f"cannot write results to {where}: {exc.strerror or exc}")


class Writer:
    """Writes records in the order it is called (the engine calls it in input order)."""

    def __init__(self, stream: IO[bytes], task: Formatter):
        self.stream = stream
        self.task = task
        self.count = 0
        self._lines: list[bytes] = []  # written out by flush(), which the engine calls per batch

    def write(self, result: Result) -> None:
        self._lines.append(self.render(result))
        self.count += 1

    def write_partial(self, text: str) -> None:
        """A piece of a result as it is produced (streamed generation); the line ends with write()."""
        raise UsageError("this output format cannot stream partial results")

    def render(self, result: Result) -> bytes:
        raise NotImplementedError

    def flush(self) -> None:
        try:
            if self._lines:
                data = b"".join(self._lines)
                self._lines = []
                self.stream.write(data)
            self.stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:  # a full disk (ENOSPC), a closed stdout (EBADF), an I/O error
            raise OutputError(self.stream, exc) from exc

    def close(self) -> None:
        self.flush()


class TextWriter(Writer):
    """The main result per line; an empty or failed record is an empty line."""

    _streamed = False

    def write_partial(self, text: str) -> None:
        self.flush()
        self.stream.write(escape_text(text).encode("utf-8", "replace"))
        self.stream.flush()
        self._streamed = True

    def render(self, result):
        if self._streamed:  # the text went out piece by piece already: end its line
            self._streamed = False
            return b"\n"
        text = "" if result.value is None else escape_text(self.task.to_text(result.value))
        return (text + "\n").encode("utf-8", "replace")


class JsonlWriter(Writer):
    """The input record (JSONL input) or {"text": ...}, plus the task's fields, plus "error" if any."""

    def render(self, result):
        record = result.record
        obj = result.to_dict()
        raw_numbers: list[str] = []
        if record.raw_numbers:
            obj = _hold_raw_numbers(obj, raw_numbers)
        try:
            line = self._dumps(obj, raw_numbers)
        except RecursionError:  # cannot happen for parsed input (its depth is bounded), only for results
            line = self._dumps(
                {
                    "input": record.raw if record.raw is not None else record.text,
                    "error": "result nested too deeply to write",
                },
                [],
            )
        return line

    @staticmethod
    def _dumps(obj, raw_numbers: list[str]) -> bytes:
        try:
            line = json.dumps(obj, ensure_ascii=False, allow_nan=False)
            if "\u2028" in line or "\u2029" in line or "\x85" in line:  # line breaks to str.splitlines()
                line = line.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085")
            return (_put_raw_numbers(line, raw_numbers, False) + "\n").encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates passed through from the input: keep them escaped
            return (_put_raw_numbers(json.dumps(obj, ensure_ascii=True), raw_numbers, True) + "\n").encode("ascii")
        except ValueError:  # NaN/inf scores: JSON has no such numbers
            line = json.dumps(_finite(obj), ensure_ascii=False)
            return (_put_raw_numbers(line, raw_numbers, False) + "\n").encode("utf-8", "replace")


# Numbers that Python cannot hold exactly (readers.RawNumber) are written back as they were read:
# json.dumps would quote them, so each is written as a unique placeholder string, then swapped.
_PLACEHOLDER = "\ue000onnxpipe-number-" + os.urandom(6).hex() + "-"


def _hold_raw_numbers(value, held: list[str]):
    from onnxpipe.stream.readers import RawNumber

    if isinstance(value, RawNumber):
        held.append(str(value))
        return _PLACEHOLDER + str(len(held) - 1) + "\ue000"
    if isinstance(value, dict):
        return {k: _hold_raw_numbers(v, held) for k, v in value.items()}
    if isinstance(value, list):
        return [_hold_raw_numbers(v, held) for v in value]
    return value


def _put_raw_numbers(line: str, held: list[str], ascii_only: bool) -> str:
    for i, number in enumerate(held):
        line = line.replace(json.dumps(_PLACEHOLDER + str(i) + "\ue000", ensure_ascii=ascii_only), number)
    return line


class TsvWriter(Writer):
    """The input row (TSV input) or the text, then the task's columns; tabs and newlines escaped."""

    def render(self, result):
        record, value = result.record, result.value
        if record.columns is not None:
            cells = list(record.columns)
        else:
            cells = [escape_cell(record.raw if record.raw is not None else record.text)]
        if value is None:
            cells += [""] * max(1, len(self.task.to_columns(None)))
        else:
            cells += [escape_cell(c) for c in self.task.to_columns(value)]
        return ("\t".join(cells) + "\n").encode("utf-8", "replace")


class NpyWriter(Writer):
    """A float32 matrix, one row per record, in a seekable .npy file.

    The row count is known only at the end, so the header is written by numpy.lib.format, which
    leaves room for the first axis to grow, and rewritten on close. Empty and failed records are rows of NaN.
    """

    def __init__(self, stream: IO[bytes], task: Any):
        super().__init__(stream, task)
        if not _seekable(stream):
            raise UsageError("--format npy needs -o FILE (a regular file, not a pipe)")
        self.width: int | None = None
        self.pending_nan = 0
        self.header_len = self.stream.write(self._header(0, 0))

    def write(self, result):
        import numpy as np

        value = result.value
        vector = None if value is None else np.asarray(self.task.to_vector(value), dtype="<f4").reshape(-1)
        if vector is None:
            if self.width is None:
                self.pending_nan += 1
            else:
                self.stream.write(np.full(self.width, np.nan, dtype="<f4").tobytes())
        else:
            if self.width is None:
                self.width = int(vector.shape[0])
                if self.pending_nan:
                    self.stream.write(np.full(self.width * self.pending_nan, np.nan, dtype="<f4").tobytes())
                    self.pending_nan = 0
            self.stream.write(vector.tobytes())
        self.count += 1

    def close(self):
        if self.width is None:
            self.width = 0
        header = self._header(self.count, self.width)
        if len(header) != self.header_len:  # numpy pads the header to leave room: not expected
            raise OnnxpipeError(f"the .npy header for {self.count} x {self.width} no longer fits its place")
        self.stream.seek(0)
        self.stream.write(header)
        self.stream.seek(0, 2)
        self.stream.flush()

    @staticmethod
    def _header(rows: int, cols: int) -> bytes:
        import io

        from numpy.lib import format as npy_format

        out = io.BytesIO()
        npy_format.write_array_header_1_0(out, {"descr": "<f4", "fortran_order": False, "shape": (rows, cols)})
        return out.getvalue()


def _seekable(stream) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, ValueError):
        return False


def _finite(value):
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


WRITERS = {"text": TextWriter, "jsonl": JsonlWriter, "tsv": TsvWriter, "npy": NpyWriter}


def make_writer(fmt: str, stream: IO[bytes], task: Any) -> Writer:
    return WRITERS[fmt](stream, task)
